"""INT8 / INT6 weight quantisation: error bound, packing, storage, saved checkpoints, fingerprints, banks."""

import pytest
import torch
from checkpoints import VOCAB

from runtime import CheckpointError, load_model
from runtime.loader import save_quantized
from runtime.quant import (FUSED_IN_MULTIPLE, Q_MAX, QuantizedEmbedding, QuantizedLinear, pack_int6, quantize_rows,
                           unpack_int6, weight_bytes)
from scale_bank import Bank, BankError, model_info


@pytest.mark.parametrize("bits", [8, 6])
def test_error_is_at_most_half_a_step_per_row(bits):
    weight = torch.randn(40, 64) * torch.logspace(-2, 1, 40)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(weight, bits)
    assert q.dtype == torch.int8 and q.abs().max() <= Q_MAX[bits]
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()
    assert (error.amax(1) > scale / 8).all(), "the bound is tight, not vacuous"


def test_int6_packs_four_values_in_three_bytes_and_back():
    q = torch.randint(-31, 32, (7, 48), dtype=torch.int8)
    packed = pack_int6(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 36)
    assert torch.equal(unpack_int6(packed), q)


@pytest.mark.parametrize("scheme,stored_dtype,width", [("int8", torch.int8, 1.0), ("int6", torch.uint8, 0.75)])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_quantised_model_stores_integers_and_stays_close(checkpoints, arch, scheme, stored_dtype, width):
    full = load_model(checkpoints[arch])
    quant = load_model(checkpoints[arch], quantize=scheme, quantize_embedding=True)
    linears = [m for m in quant.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == full.config.n_layer * (4 if arch == "mamba1" else 2) + (arch == "mamba2")  # + untied head
    assert isinstance(quant.model.embedding, QuantizedEmbedding)
    for layer in linears:
        assert layer.qweight.dtype == stored_dtype and layer.scale.dtype == torch.float32
        assert layer.qweight.shape[1] == int(layer.in_features * width)
    # float32 baseline; the small float parameters (A_log, D, norms, conv) weigh a lot in a tiny model
    assert weight_bytes(quant.model) < weight_bytes(full.model) * (0.4 if scheme == "int8" else 0.35)
    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    want, got = full.model.prefill(tokens)[0], quant.model.prefill(tokens)[0]
    relative = ((got - want).abs().max() / want.abs().max()).item()
    assert relative < (0.03 if scheme == "int8" else 0.15)
    assert quant.fingerprint != full.fingerprint and quant.quantization == scheme + "+embedding"


@pytest.mark.parametrize("scheme", ["int8", "int6"])
def test_saved_quantised_checkpoint_round_trips(checkpoints, tmp_path, scheme):
    quant = load_model(checkpoints["mamba1"], quantize=scheme)
    saved = save_quantized(quant, tmp_path / "q")
    again = load_model(saved, dtype="bfloat16")
    assert again.quantization == scheme and again.fingerprint == quant.fingerprint
    assert again.model.layers[0].mixer.in_proj.scale.dtype == torch.float32  # scales stay float32 in bf16
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_model(saved).model.prefill(tokens)[0], quant.model.prefill(tokens)[0])
    assert (saved / "model.safetensors").stat().st_size < (checkpoints["mamba1"] / "model.safetensors").stat().st_size
    with pytest.raises(CheckpointError, match=f"saved quantised as {scheme}; cannot load as int"):
        load_model(saved, quantize="int6" if scheme == "int8" else "int8")


def test_bank_of_the_quantised_model_is_refused_on_full_precision_and_back(checkpoints, tmp_path):
    full = load_model(checkpoints["mamba1"])
    quant = load_model(checkpoints["mamba1"], quantize="int8")
    Bank.create(tmp_path / "q", model_info(quant.config, quant.fingerprint, quant.quantization))
    Bank.create(tmp_path / "f", model_info(full.config, full.fingerprint, full.quantization))
    Bank.load(tmp_path / "q", quant.config, quant.fingerprint, quant.quantization)
    with pytest.raises(BankError, match="fingerprint|quantization"):
        Bank.load(tmp_path / "q", full.config, full.fingerprint, full.quantization)
    with pytest.raises(BankError, match="fingerprint|quantization"):
        Bank.load(tmp_path / "f", quant.config, quant.fingerprint, quant.quantization)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_int8_decode_runs_the_int8_kernel_and_agrees_with_the_dequantised_prefill(checkpoints, arch, dtype):
    """Decode steps (few rows) go through torch._weight_int8pack_mm; the prefill dequantises; same model."""
    quant = load_model(checkpoints[arch], dtype=dtype, quantize="int8", quantize_embedding=True)
    model = quant.model
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    prefill_logits = model.logits(model.hidden_states(tokens)[0])  # (2, 12, V): dequantised weights
    logits, state = model.prefill(tokens[:, :4])
    stepped = [model.step(tokens[:, t], state) for t in range(4, 12)]
    tolerance = 1e-4 if dtype == "float32" else 0.05
    for t, step_logits in zip(range(4, 12), stepped):
        torch.testing.assert_close(step_logits, prefill_logits[:, t],
                                   atol=tolerance * prefill_logits.abs().max().item(), rtol=0)
    linears = [m for m in model.layers.modules()
               if isinstance(m, QuantizedLinear) and m.in_features % FUSED_IN_MULTIPLE == 0]
    assert len(linears) >= 2 * model.config.n_layer
    assert all(m._fused == {("cpu", model.dtype): True} for m in linears), "the int8 kernel was not used"
    head = model.embedding if model.lm_head is None else model.lm_head
    assert head._fused == {("cpu", model.dtype): True}  # the LM head too


def test_quantize_command_writes_a_checkpoint_that_loads_with_the_same_fingerprint(checkpoints, tmp_path, capsys):
    from runtime.quantize import main
    out = tmp_path / "int8"
    assert main(["--model", str(checkpoints["mamba1"]), "--scheme", "int8", "--out", str(out)]) == 0
    assert load_model(out).fingerprint == load_model(checkpoints["mamba1"], quantize="int8").fingerprint
    assert main(["--model", str(checkpoints["mamba1"]), "--scheme", "int8", "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "absent"), "--scheme", "int6", "--out", str(tmp_path / "x")]) == 2
    assert "absent" in capsys.readouterr().err
