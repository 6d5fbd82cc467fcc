"""Bucket names ↔ lengths (k = 1024 tokens)."""

import pytest

from scale_bank import bucket_name, parse_buckets, parse_length


@pytest.mark.parametrize("text, tokens", [
    ("4k", 4096), ("1k", 1024), ("64k", 65536), ("512", 512), ("1.5k", 1536), ("1.125k", 1152), (" 8K ", 8192),
    ("100", 100), ("0.5k", 512),
])
def test_parse_length(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text, fault", [
    ("", "bad bucket length ''"), ("4kb", "'4kb'"), ("k", "'k'"), ("-4k", "'-4k'"), ("4 k", "'4 k'"),
    ("1.1k", r"'1\.1k': 1126\.4 is not a whole number"), ("512.5", "not a whole number"),
    ("0", "'0': must be positive"),
    ("0k", "must be positive"), ("1e3", "'1e3'"),
])
def test_parse_length_refuses(text, fault):
    with pytest.raises(ValueError, match=fault):
        parse_length(text)


def test_parse_buckets():
    assert parse_buckets("4k,8k,16k") == [4096, 8192, 16384]
    assert parse_buckets("16k, 2k,1.5k") == [1536, 2048, 16384]  # shortest first
    with pytest.raises(ValueError, match="'4k,4096': a length appears twice"):
        parse_buckets("4k,4096")
    with pytest.raises(ValueError, match="bad bucket length ''"):
        parse_buckets("4k,,8k")


@pytest.mark.parametrize("tokens, name", [
    (4096, "4k"), (1024, "1k"), (65536, "64k"), (512, "512"), (1536, "1.5k"), (1152, "1.125k"), (1100, "1100"),
    (2048 * 1000, "2000k"), (1, "1"),
])
def test_bucket_name(tokens, name):
    assert bucket_name(tokens) == name


def test_names_round_trip():
    assert all(parse_length(bucket_name(n)) == n for n in range(1, 70_000))


@pytest.mark.parametrize("bad", [0, -1024, 4096.0, "4k", True])
def test_bucket_name_refuses(bad):
    with pytest.raises(ValueError, match="bad bucket length"):
        bucket_name(bad)
