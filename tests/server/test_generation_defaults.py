"""The model's generation config as vLLM takes it: defaults for the sampling fields a request leaves out, a chat
turn's length, a server-wide cap on max_tokens, end-of-turn tokens that stop a completion; --generation-config
vllm and --override-generation-config; bad configs stop the start naming the file and the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from server.config import ConfigError, parse_args
from server.generation_defaults import load_generation_defaults
from server_helpers import SERVER_FLAGS, LiveServer

END_OF_TURN = 50  # an ordinary token of the tiny tokenizer, named the config's end of turn
VOCAB = 96


def config_dir(path: Path, **values) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(values))
    return path


def test_the_model_directory_config_gives_the_sampling_defaults_and_its_end_of_turn_tokens(tmp_path):
    model = config_dir(tmp_path / "model", temperature=0.6, top_k=50, do_sample=True, max_new_tokens=7,
                       eos_token_id=[0, 5, 9], bos_token_id=0, pad_token_id=None)
    auto = load_generation_defaults(model, "auto", {}, eos_token_id=0, vocab_size=VOCAB)
    assert auto.sampling == {"temperature": 0.6, "top_k": 50}
    assert (auto.max_tokens, auto.max_tokens_cap, auto.stop_token_ids) == (7, None, (5, 9))
    neutral = load_generation_defaults(model, "vllm", {}, eos_token_id=0, vocab_size=VOCAB)
    assert (neutral.sampling, neutral.max_tokens, neutral.stop_token_ids) == ({}, None, (5, 9))
    overridden = load_generation_defaults(model, "auto", {"temperature": 0.2, "max_new_tokens": 3}, 0, VOCAB)
    assert overridden.sampling == {"temperature": 0.2, "top_k": 50}
    assert (overridden.max_tokens, overridden.max_tokens_cap) == (3, 3)
    assert load_generation_defaults(tmp_path / "bare", "auto", {}, 0, VOCAB).sampling == {}


def test_a_chosen_folder_replaces_the_model_config_and_its_max_new_tokens_caps_requests(tmp_path):
    model = config_dir(tmp_path / "model", temperature=0.6, eos_token_id=5)
    folder = config_dir(tmp_path / "folder", top_p=0.9, max_new_tokens=12)
    chosen = load_generation_defaults(model, str(folder), {}, 0, VOCAB)
    assert (chosen.sampling, chosen.max_tokens, chosen.max_tokens_cap, chosen.stop_token_ids) == \
        ({"top_p": 0.9}, 12, 12, ())
    with pytest.raises(ConfigError, match="--generation-config .*: no generation_config.json"):
        load_generation_defaults(model, str(tmp_path / "nowhere"), {}, 0, VOCAB)


@pytest.mark.parametrize("values, named", [
    ({"top_p": 1.5}, "top_p 1.5"), ({"temperature": -1}, "temperature -1"), ({"top_k": "40"}, "top_k '40'"),
    ({"max_new_tokens": -2}, "max_new_tokens -2"), ({"eos_token_id": [5, VOCAB]}, "eos_token_id"),
    ({"eos_token_id": True}, "eos_token_id"),
])
def test_a_value_no_request_could_send_stops_the_start_naming_the_file_and_key(tmp_path, values, named):
    model = config_dir(tmp_path, **values)
    with pytest.raises(ConfigError) as raised:
        load_generation_defaults(model, "auto", {}, 0, VOCAB)
    assert str(model / "generation_config.json") in str(raised.value) and named in str(raised.value)


def test_a_config_that_is_not_a_json_object_and_an_override_that_is_not_json_are_refused(tmp_path, capsys):
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="a generation config is a JSON object"):
        load_generation_defaults(tmp_path, "auto", {}, 0, VOCAB)
    with pytest.raises(ConfigError, match=r"\(with --override-generation-config\): temperature"):
        load_generation_defaults(tmp_path / "bare", "auto", {"temperature": "hot"}, 0, VOCAB)
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path), "--override-generation-config", "{temperature: 1}"])
    assert "--override-generation-config: not JSON" in capsys.readouterr().err


@pytest.fixture(scope="module")
def configured(model_dirs, tmp_path_factory):
    """The tiny model whose generation config asks for greedy choices and names END_OF_TURN, served with an
    override capping every request at 6 tokens, and a chat template."""
    model = shutil.copytree(model_dirs["mamba1"], tmp_path_factory.mktemp("generation") / "model")
    config_dir(model, temperature=0.0, eos_token_id=[0, END_OF_TURN])
    (model / "template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with LiveServer(["--model", str(model), *SERVER_FLAGS, "--chat-template", str(model / "template.jinja"),
                     "--override-generation-config", '{"max_new_tokens": 6}']) as live:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            yield client


def completion(client: httpx.Client, **fields) -> dict:
    response = client.post("/v1/completions", json={"prompt": "the river ran", "max_tokens": 6, "ignore_eos": True,
                                                    "logit_bias": {str(END_OF_TURN): -100}, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_request_without_temperature_gets_the_configs_greedy_choice(configured):
    defaulted = completion(configured, n=3)["choices"]
    greedy = completion(configured, temperature=0)["choices"][0]["text"]
    assert [c["text"] for c in defaulted] == [greedy] * 3
    # the same request at the neutral temperature samples: the config is what made them equal
    sampled = {completion(configured, temperature=1.0, seed=seed)["choices"][0]["text"] for seed in range(4)}
    assert sampled - {greedy}


def test_the_override_caps_max_tokens_and_gives_a_chat_turn_its_length(configured):
    capped = completion(configured, max_tokens=20)
    assert capped["usage"]["completion_tokens"] == 6 and capped["choices"][0]["finish_reason"] == "length"
    chat = configured.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the mill"}],
                                                         "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 6


def test_the_configs_end_of_turn_token_ends_a_completion_as_a_stop_token_unless_eos_is_ignored(configured):
    ended = completion(configured, ignore_eos=False, logit_bias={str(END_OF_TURN): 100})
    choice = ended["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"], ended["usage"]["completion_tokens"]) == \
        ("stop", END_OF_TURN, 1)
    ignored = completion(configured, logit_bias={str(END_OF_TURN): 100})
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 6
