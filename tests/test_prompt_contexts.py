"""Contexts and preservation anchors in ``[[prompts]]`` (``library/prompt_contexts.py``).

The malformed cases (a context without ``{}`` or with two, bad files, preserve with a concept
offset) are in ``tests/test_prompts.py``'s ``BAD_FILES``, run through ``train_leco.main``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from library.prompt_contexts import put_in_context, tidy_prompt
from library.prompts import load_prompt_file, parse_prompt_text


def prompts_of(settings) -> list[tuple[str, str, str, str, str]]:
    return [(s.prompt, s.positive, s.negative, s.neutral, s.action) for s in settings]


@pytest.mark.parametrize("text, expected", [
    ("a large  square", "a large square"),
    ("  in a forest", "in a forest"),
    (", oil painting", "oil painting"),
    ("a photo of , 4k", "a photo of, 4k"),
    ("cat , , dog", "cat, dog"),
    ("red\tcar\n", "red car"),
    ("", ""),
    ("a cat.", "a cat."),
])
def test_tidy_prompt(text, expected):
    assert tidy_prompt(text) == expected


def test_put_in_context():
    assert put_in_context("a large {} square", "red") == "a large red square"
    assert put_in_context("a large {} square", "") == "a large square"
    assert put_in_context("{}, oil painting", "") == "oil painting"
    assert put_in_context("{}", "van gogh") == "van gogh"
    assert put_in_context("{} in a forest", "a red car") == "a red car in a forest"
    assert put_in_context(None, " red  car ") == " red  car "  # no context: the prompt exactly as written


def test_erase_in_context_expands_every_prompt():
    """The issue's example: erasing "red" in "a large {} square" regresses "a large red square"
    towards "a large square" and away from red; one setting per context, in order."""
    text = '[[prompts]]\ntarget = "red"\ncontexts = ["a large {} square", "{} in a forest", "{}"]\n'
    settings = parse_prompt_text(text, Path("."), "t.toml")
    assert prompts_of(settings) == [
        ("a large red square", "a large red square", "a large square", "a large square", "erase"),
        ("red in a forest", "red in a forest", "in a forest", "in a forest", "erase"),
        ("red", "red", "", "", "erase"),
    ]
    assert [s.source for s in settings] == ["[[prompts]][1] context 'a large {} square'",
                                            "[[prompts]][1] context '{} in a forest'", "[[prompts]][1] context '{}'"]


def test_every_field_goes_into_the_context_and_other_fields_are_kept():
    text = """
[[prompts]]
target = "van gogh"
positive = "van gogh style"
unconditional = "blurry"
neutral = "photo"
action = "enhance"
guidance_scale = 2.0
resolution = [512, 768]
batch_size = 2
multiplier = 1.5
weight = 0.5
contexts = ["a painting of a house, {}"]
"""
    (setting,) = parse_prompt_text(text, Path("."), "t.toml")
    assert prompts_of([setting]) == [("a painting of a house, van gogh", "a painting of a house, van gogh style",
                                      "a painting of a house, blurry", "a painting of a house, photo", "enhance")]
    assert (setting.guidance_scale, setting.resolution, setting.batch_size, setting.multiplier, setting.weight) == (
        2.0, (512, 768), 2, 1.5, 0.5)


def test_without_contexts_an_entry_is_unchanged():
    text = '[[prompts]]\ntarget = "red"\n'
    (setting,) = parse_prompt_text(text, Path("."), "t.toml")
    assert prompts_of([setting]) == [("red", "red", "", "", "erase")] and setting.source == "[[prompts]][1]"


def test_top_level_contexts_are_a_default_and_an_entry_list_replaces_them(tmp_path):
    text = """
contexts = ["a {}", "{}"]

[[prompts]]
target = "red"

[[prompts]]
target = "blue"
contexts = ["a {} circle"]
"""
    settings = parse_prompt_text(text, tmp_path, "t.toml")
    assert [s.prompt for s in settings] == ["a red", "red", "a blue circle"]


def test_context_file_lines_are_combined_with_the_list_and_deduplicated(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "contexts.txt").write_text("# contexts\n\n  a large {} square  \n{}\na {} circle\n", encoding="utf-8")
    text = '[[prompts]]\ntarget = "red"\ncontexts = ["{}", "{} "]\ncontext_prompt_file = "sub/contexts.txt"\n'
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    settings = load_prompt_file(path).settings
    assert [s.prompt for s in settings] == ["red", "a large red square", "a red circle"]


def test_contexts_times_resolutions():
    text = '[[prompts]]\ntarget = "red"\ncontexts = ["a {}", "{}"]\n'
    two = parse_prompt_text('resolution = 256\n' + text, Path("."), "t.toml")
    assert [(s.prompt, s.resolution) for s in two] == [("a red", (256, 256)), ("red", (256, 256))]


def test_preserve_entry_keeps_the_frozen_prediction_of_its_target():
    """A preserve setting regresses onto eps(target): positive = neutral = target, g = 0 whatever
    the top-level guidance_scale; its unconditional stays the CFG negative of the trajectory."""
    text = 'guidance_scale = 3.0\n[[prompts]]\ntarget = "green"\naction = "preserve"\nweight = 2.0\nunconditional = "blur"\n'
    (setting,) = parse_prompt_text(text, Path("."), "t.toml")
    assert prompts_of([setting]) == [("green", "green", "blur", "green", "preserve")]
    assert (setting.guidance_scale, setting.weight, setting.log_group) == (0.0, 2.0, "preserve")


def test_preserve_in_context():
    text = """
contexts = ["a large {} square", "{}"]

[[prompts]]
target = "red"

[[prompts]]
target = "green"
action = "preserve"
"""
    settings = parse_prompt_text(text, Path("."), "t.toml")
    assert prompts_of(settings) == [
        ("a large red square", "a large red square", "a large square", "a large square", "erase"),
        ("red", "red", "", "", "erase"),
        ("a large green square", "a large green square", "a large square", "a large green square", "preserve"),
        ("green", "green", "", "green", "preserve"),
    ]


def test_anchors_are_put_into_each_context():
    text = """
contexts = ["{}", "a {} circle"]

[[prompts]]
target = "red"
anchors = ["", "green", ""]
anchor_weight = 2.0
"""
    settings = parse_prompt_text(text, Path("."), "t.toml")
    assert [(s.prompt, s.anchors, s.anchor_weight) for s in settings] == [
        ("red", ("", "green"), 2.0), ("a red circle", ("a circle", "a green circle"), 2.0)]
    assert settings[1].prompts == ("a red circle", "a red circle", "a circle", "a circle", "a circle", "a green circle")
    assert settings[1].as_dict()["anchors"] == ["a circle", "a green circle"]


def test_top_level_anchors_are_defaults_and_preserve_entries_take_none():
    text = """
anchors = [""]
anchor_weight = 0.5

[[prompts]]
target = "red"

[[prompts]]
target = "blue"
anchors = ["green"]

[[prompts]]
target = "yellow"
action = "preserve"
"""
    settings = parse_prompt_text(text, Path("."), "t.toml")
    assert [(s.prompt, s.anchors, s.anchor_weight) for s in settings] == [
        ("red", ("",), 0.5), ("blue", ("green",), 0.5), ("yellow", (), 1.0)]


def test_without_anchors_a_setting_has_none():
    (setting,) = parse_prompt_text('[[prompts]]\ntarget = "red"\n', Path("."), "t.toml")
    assert (setting.anchors, setting.anchor_weight) == ((), 1.0) and setting.prompts == ("red", "red", "", "")


def test_training_with_contexts_and_both_anchor_forms(tiny_sd_dir, tmp_path, caplog):
    """End to end on a tiny SD model: every context, anchor and preserve prompt is encoded, each
    kind of setting trains, and the metadata keeps the prompt file as written."""
    import logging

    import train_leco
    from networks.lora_files import read_lora_metadata
    from tests.helpers import base_argv

    (tmp_path / "contexts.txt").write_text("{}\na photo of {}\n", encoding="utf-8")
    text = """resolution = 64
context_prompt_file = "contexts.txt"

[[prompts]]
target = "van gogh"
anchors = ["", "monet"]

[[prompts]]
target = "a cat"
action = "preserve"
"""
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert train_leco.main(base_argv(tiny_sd_dir, prompts, tmp_path / "out", steps=6)) == 0
    assert "prompt settings: 4 (2 erase, 2 preserve)" in caplog.text
    assert set(load_prompt_file(prompts).all_prompts) == {
        "van gogh", "", "monet", "a photo of van gogh", "a photo of", "a photo of monet", "a cat", "a photo of a cat"}
    assert "cached 8 prompt embeddings" in caplog.text
    assert read_lora_metadata(tmp_path / "out" / "leco.safetensors")["ss_leco_prompts"] == text
