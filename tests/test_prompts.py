"""The prompt TOML (``library/prompts.py``): the user guide's examples, defaults, expansion, and a
corpus of malformed files whose errors must name the file, the entry and the key.

Expected settings are written out by hand as tuples::

    (target, positive, unconditional, neutral, action, multiplier, guidance_scale, resolution,
     batch_size, weight)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from library.errors import UserError
from library.prompts import PromptFile, PromptSetting, load_prompt_file, parse_prompt_text

GUIDE = Path("/work/shared/seeds/leco-user-guide.txt")


def rows(settings) -> list[tuple]:
    """The fields a test pins, in the order of the module docstring."""
    return [
        (s.prompt, s.positive, s.negative, s.neutral, s.action, s.multiplier, s.guidance_scale,
         s.resolution, s.batch_size, s.weight)
        for s in settings
    ]


def write(folder: Path, text: str, name: str = "prompts.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(folder: Path, text: str) -> tuple[PromptSetting, ...]:
    return load_prompt_file(write(folder, text)).settings


# ----------------------------------------------------------------------------------------------
# The examples of the user guide, verbatim.

GUIDE_FORMAT_1 = """\
[[prompts]]
target = "van gogh"
positive = "van gogh"
unconditional = ""
neutral = ""
action = "erase"
guidance_scale = 1.0
resolution = 512
batch_size = 1
multiplier = 1.0
weight = 1.0
"""

GUIDE_FORMAT_2 = """\
guidance_scale = 1.0
resolution = 1024
neutral = ""

[[targets]]
target_class = "1girl"
positive = "1girl, long hair"
negative = "1girl, short hair"
multiplier = 1.0
weight = 1.0
"""

GUIDE_MULTIPLE_NEUTRALS = """\
guidance_scale = 1.5
resolution = 1024
neutrals = ["", "photo of a person", "cinematic portrait"]

[[targets]]
target_class = "person"
positive = "smiling person"
negative = "expressionless person"
"""

GUIDE_NEUTRAL_FILE = """\
neutral_prompt_file = "neutrals.txt"

[[targets]]
target_class = ""
positive = "high detail"
negative = "low detail"
"""

GUIDE_ERASE_STYLE = """\
[[prompts]]
target = "van gogh"
positive = "van gogh"
unconditional = ""
neutral = ""
action = "erase"
guidance_scale = 1.5
resolution = 512
batch_size = 2
multiplier = 1.0
weight = 1.0
"""

GUIDE_ENHANCE = """\
[[prompts]]
target = "detailed"
positive = "highly detailed, intricate details"
unconditional = ""
neutral = ""
action = "enhance"
guidance_scale = 2.0
resolution = 512
batch_size = 2
multiplier = 1.0
weight = 1.0
"""

GUIDE_SLIDER = """\
guidance_scale = 1.0
resolution = 512

[[targets]]
target_class = "1girl"
positive = "1girl, long hair"
negative = "1girl, short hair"
multiplier = 1.0
weight = 1.0
"""

# The guide does not show neutrals.txt; this one has a comment, blank lines, padding and a duplicate.
NEUTRALS_TXT = "# neutral prompts\n\nphoto of a room\n  a landscape painting  \n\n# again\nphoto of a room\n"

GUIDE_EXPECTED = {
    "format_1": (GUIDE_FORMAT_1, [
        ("van gogh", "van gogh", "", "", "erase", 1.0, 1.0, (512, 512), 1, 1.0),
    ]),
    "format_2": (GUIDE_FORMAT_2, [
        ("1girl", "1girl, long hair", "1girl, short hair", "", "enhance", 1.0, 1.0, (1024, 1024), 1, 1.0),
        ("1girl", "1girl, short hair", "1girl, long hair", "", "enhance", -1.0, 1.0, (1024, 1024), 1, 1.0),
    ]),
    "multiple_neutrals": (GUIDE_MULTIPLE_NEUTRALS, [
        ("person", "smiling person", "expressionless person", "", "enhance", 1.0, 1.5, (1024, 1024), 1, 1.0),
        ("person", "expressionless person", "smiling person", "", "enhance", -1.0, 1.5, (1024, 1024), 1, 1.0),
        ("person", "smiling person", "expressionless person", "photo of a person", "enhance", 1.0, 1.5, (1024, 1024), 1, 1.0),
        ("person", "expressionless person", "smiling person", "photo of a person", "enhance", -1.0, 1.5, (1024, 1024), 1, 1.0),
        ("person", "smiling person", "expressionless person", "cinematic portrait", "enhance", 1.0, 1.5, (1024, 1024), 1, 1.0),
        ("person", "expressionless person", "smiling person", "cinematic portrait", "enhance", -1.0, 1.5, (1024, 1024), 1, 1.0),
    ]),
    "neutral_prompt_file": (GUIDE_NEUTRAL_FILE, [
        ("", "high detail", "low detail", "photo of a room", "enhance", 1.0, 1.0, (512, 512), 1, 1.0),
        ("", "low detail", "high detail", "photo of a room", "enhance", -1.0, 1.0, (512, 512), 1, 1.0),
        ("", "high detail", "low detail", "a landscape painting", "enhance", 1.0, 1.0, (512, 512), 1, 1.0),
        ("", "low detail", "high detail", "a landscape painting", "enhance", -1.0, 1.0, (512, 512), 1, 1.0),
    ]),
    "use_case_erase_style": (GUIDE_ERASE_STYLE, [
        ("van gogh", "van gogh", "", "", "erase", 1.0, 1.5, (512, 512), 2, 1.0),
    ]),
    "use_case_enhance": (GUIDE_ENHANCE, [
        ("detailed", "highly detailed, intricate details", "", "", "enhance", 1.0, 2.0, (512, 512), 2, 1.0),
    ]),
    "use_case_slider": (GUIDE_SLIDER, [
        # No neutral anywhere: the neutral is the target class itself.
        ("1girl", "1girl, long hair", "1girl, short hair", "1girl", "enhance", 1.0, 1.0, (512, 512), 1, 1.0),
        ("1girl", "1girl, short hair", "1girl, long hair", "1girl", "enhance", -1.0, 1.0, (512, 512), 1, 1.0),
    ]),
}


@pytest.mark.parametrize("name", list(GUIDE_EXPECTED))
def test_guide_example_expansion(name, tmp_path):
    text, expected = GUIDE_EXPECTED[name]
    write(tmp_path, NEUTRALS_TXT, "neutrals.txt")
    prompt_file = load_prompt_file(write(tmp_path, text))
    assert rows(prompt_file.settings) == expected
    assert prompt_file.text == text
    for setting in prompt_file.settings:
        assert isinstance(setting.resolution, tuple)
        assert isinstance(setting.batch_size, int) and not isinstance(setting.batch_size, bool)
        assert setting.dynamic_resolution is False and setting.dynamic_crops is False


@pytest.mark.skipif(not GUIDE.is_file(), reason="user guide not available")
@pytest.mark.parametrize("name", list(GUIDE_EXPECTED))
def test_guide_examples_are_verbatim(name):
    """The TOML above is the guide's text (modulo blank-line spacing), so the pins follow the guide."""
    guide = " ".join(GUIDE.read_text(encoding="utf-8").split())
    assert " ".join(GUIDE_EXPECTED[name][0].split()) in guide


# ----------------------------------------------------------------------------------------------
# [[prompts]]


def test_prompts_defaults(tmp_path):
    settings = load(tmp_path, '[[prompts]]\ntarget = "cat"\n')
    assert rows(settings) == [("cat", "cat", "", "", "erase", 1.0, 1.0, (512, 512), 1, 1.0)]
    (setting,) = settings
    assert setting.source == "[[prompts]][1]"
    assert type(setting.guidance_scale) is float and type(setting.multiplier) is float and type(setting.weight) is float


def test_prompts_all_fields_and_height_width(tmp_path):
    settings = load(tmp_path, """
[[prompts]]
target = "cat"
positive = "a cat, photo"
unconditional = "blurry"
neutral = "an animal"
action = "enhance"
guidance_scale = 3
resolution = [512, 768]
batch_size = 4
multiplier = -0.5
weight = 2
dynamic_resolution = true
dynamic_crops = true
""")
    assert rows(settings) == [("cat", "a cat, photo", "blurry", "an animal", "enhance", -0.5, 3.0, (512, 768), 4, 2.0)]
    assert settings[0].dynamic_resolution is True and settings[0].dynamic_crops is True


def test_prompts_inline_array_of_tables_and_order(tmp_path):
    settings = load(tmp_path, 'prompts = [{target = "a"}, {target = "b", action = "enhance"}]\n')
    assert [(s.prompt, s.action, s.source) for s in settings] == [
        ("a", "erase", "[[prompts]][1]"), ("b", "enhance", "[[prompts]][2]")]


def test_prompts_get_shared_top_level_defaults(tmp_path):
    settings = load(tmp_path, """
guidance_scale = 2.5
resolution = [768, 512]
batch_size = 3
dynamic_crops = true

[[prompts]]
target = "a"

[[prompts]]
target = "b"
guidance_scale = 0.5
resolution = 640
batch_size = 1
""")
    assert rows(settings) == [
        ("a", "a", "", "", "erase", 1.0, 2.5, (768, 512), 3, 1.0),
        ("b", "b", "", "", "erase", 1.0, 0.5, (640, 640), 1, 1.0),
    ]
    assert [s.dynamic_crops for s in settings] == [True, True]


def test_guidance_scale_zero_is_allowed(tmp_path):
    (setting,) = load(tmp_path, '[[prompts]]\ntarget = "a"\nguidance_scale = 0\n')
    assert setting.guidance_scale == 0.0


# ----------------------------------------------------------------------------------------------
# [[targets]]


def test_targets_only_positive_pole(tmp_path):
    settings = load(tmp_path, '[[targets]]\ntarget_class = "person"\npositive = "smiling person"\nneutral = ""\n')
    assert rows(settings) == [
        ("person", "smiling person", "", "", "enhance", 1.0, 1.0, (512, 512), 1, 1.0),
        ("person", "smiling person", "", "", "erase", -1.0, 1.0, (512, 512), 1, 1.0),
    ]
    assert [s.source for s in settings] == ["[[targets]][1] +", "[[targets]][1] -"]


def test_targets_only_negative_pole(tmp_path):
    settings = load(tmp_path, '[[targets]]\ntarget_class = "person"\nnegative = "sad person"\nneutral = ""\n')
    assert rows(settings) == [
        ("person", "sad person", "", "", "erase", 1.0, 1.0, (512, 512), 1, 1.0),
        ("person", "sad person", "", "", "enhance", -1.0, 1.0, (512, 512), 1, 1.0),
    ]


def test_targets_empty_pole_counts_as_missing(tmp_path):
    settings = load(tmp_path, '[[targets]]\ntarget_class = "x"\npositive = ""\nnegative = "n"\n')
    assert rows(settings) == [
        ("x", "n", "", "x", "erase", 1.0, 1.0, (512, 512), 1, 1.0),
        ("x", "n", "", "x", "enhance", -1.0, 1.0, (512, 512), 1, 1.0),
    ]


def test_targets_multiplier_and_weight_per_target(tmp_path):
    settings = load(tmp_path, """
[[targets]]
target_class = "a"
positive = "p"
negative = "n"
multiplier = 2.5
weight = 0.5

[[targets]]
target_class = "b"
positive = "q"
""")
    assert rows(settings) == [
        ("a", "p", "n", "a", "enhance", 2.5, 1.0, (512, 512), 1, 0.5),
        ("a", "n", "p", "a", "enhance", -2.5, 1.0, (512, 512), 1, 0.5),
        ("b", "q", "", "b", "enhance", 1.0, 1.0, (512, 512), 1, 1.0),
        ("b", "q", "", "b", "erase", -1.0, 1.0, (512, 512), 1, 1.0),
    ]
    assert [s.source for s in settings] == ["[[targets]][1] +", "[[targets]][1] -", "[[targets]][2] +", "[[targets]][2] -"]


def test_targets_per_target_overrides_of_top_level_defaults(tmp_path):
    settings = load(tmp_path, """
guidance_scale = 2.0
resolution = 768
batch_size = 3
neutral = "top"

[[targets]]
target_class = "a"
positive = "p"
negative = "n"
guidance_scale = 4.0
resolution = [512, 640]
batch_size = 2
neutral = "own"

[[targets]]
target_class = "b"
positive = "q"
negative = "r"
""")
    assert rows(settings) == [
        ("a", "p", "n", "own", "enhance", 1.0, 4.0, (512, 640), 2, 1.0),
        ("a", "n", "p", "own", "enhance", -1.0, 4.0, (512, 640), 2, 1.0),
        ("b", "q", "r", "top", "enhance", 1.0, 2.0, (768, 768), 3, 1.0),
        ("b", "r", "q", "top", "enhance", -1.0, 2.0, (768, 768), 3, 1.0),
    ]


def test_top_level_resolutions_list(tmp_path):
    settings = load(tmp_path, """
resolutions = [512, [512, 768]]
neutral = ""

[[targets]]
target_class = "c"
positive = "p"
negative = "n"
""")
    assert rows(settings) == [
        ("c", "p", "n", "", "enhance", 1.0, 1.0, (512, 512), 1, 1.0),
        ("c", "n", "p", "", "enhance", -1.0, 1.0, (512, 512), 1, 1.0),
        ("c", "p", "n", "", "enhance", 1.0, 1.0, (512, 768), 1, 1.0),
        ("c", "n", "p", "", "enhance", -1.0, 1.0, (512, 768), 1, 1.0),
    ]


def test_neutral_x_resolution_x_direction_order(tmp_path):
    settings = load(tmp_path, """
[[targets]]
target_class = "c"
positive = "p"
neutrals = ["n1", "n2"]
resolutions = [[768, 512], 1024]
""")
    assert [(s.neutral, s.resolution, s.multiplier, s.action) for s in settings] == [
        ("n1", (768, 512), 1.0, "enhance"),
        ("n1", (768, 512), -1.0, "erase"),
        ("n1", (1024, 1024), 1.0, "enhance"),
        ("n1", (1024, 1024), -1.0, "erase"),
        ("n2", (768, 512), 1.0, "enhance"),
        ("n2", (768, 512), -1.0, "erase"),
        ("n2", (1024, 1024), 1.0, "enhance"),
        ("n2", (1024, 1024), -1.0, "erase"),
    ]


def test_entry_resolution_beats_top_level_resolutions(tmp_path):
    settings = load(tmp_path, """
resolutions = [512, 768]

[[targets]]
target_class = "a"
positive = "p"
resolution = 1024

[[targets]]
target_class = "b"
positive = "p"
""")
    assert [(s.prompt, s.resolution) for s in settings] == [
        ("a", (1024, 1024)), ("a", (1024, 1024)),
        ("b", (512, 512)), ("b", (512, 512)), ("b", (768, 768)), ("b", (768, 768)),
    ]


def test_entry_resolutions_beat_top_level_resolution(tmp_path):
    settings = load(tmp_path, """
resolution = 1024

[[targets]]
target_class = "a"
positive = "p"
resolutions = [512, [640, 512]]
""")
    assert [s.resolution for s in settings] == [(512, 512), (512, 512), (640, 512), (640, 512)]


def test_neutral_defaults_to_target_class(tmp_path):
    settings = load(tmp_path, '[[targets]]\ntarget_class = "dog"\npositive = "big dog"\nnegative = "small dog"\n')
    assert [s.neutral for s in settings] == ["dog", "dog"]


def test_explicit_empty_neutral_is_kept(tmp_path):
    settings = load(tmp_path, '[[targets]]\ntarget_class = "dog"\npositive = "big dog"\nneutral = ""\n')
    assert [s.neutral for s in settings] == ["", ""]


def test_target_neutrals_replace_top_level_neutrals(tmp_path):
    settings = load(tmp_path, """
neutrals = ["t1", "t2"]

[[targets]]
target_class = "a"
positive = "p"
neutrals = ["own"]

[[targets]]
target_class = "b"
positive = "p"
""")
    assert [(s.prompt, s.neutral) for s in settings] == [
        ("a", "own"), ("a", "own"),
        ("b", "t1"), ("b", "t1"), ("b", "t2"), ("b", "t2"),
    ]


def test_neutral_neutrals_and_file_combined_and_deduplicated(tmp_path):
    write(tmp_path, "x\n# comment\n\ny\nz\n  x  \n", "more.txt")
    settings = load(tmp_path, """
[[targets]]
target_class = "a"
positive = "p"
neutral = "y"
neutrals = ["y", "x", "w", "x"]
neutral_prompt_file = "more.txt"
""")
    assert [s.neutral for s in settings[::2]] == ["y", "x", "w", "z"]


def test_neutral_file_is_relative_to_the_toml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "config" / "sub"
    write(folder, "\n\n   \n# only a comment\nfirst\n\tsecond\t\nfirst\n", "neutrals/list.txt")
    path = write(folder, '[[targets]]\ntarget_class = "a"\npositive = "p"\nneutral_prompt_file = "neutrals/list.txt"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_prompt_file(path).settings
    assert [s.neutral for s in settings] == ["first", "first", "second", "second"]
    # A relative path to the TOML itself works too.
    monkeypatch.chdir(tmp_path)
    assert load_prompt_file(Path("config/sub/prompts.toml")).settings == settings


def test_neutral_file_absolute_path(tmp_path):
    neutral_file = write(tmp_path / "abs", "one\n", "n.txt")
    settings = load(tmp_path, f'neutral_prompt_file = "{neutral_file.as_posix()}"\n[[targets]]\ntarget_class = "a"\nnegative = "n"\n')
    assert [s.neutral for s in settings] == ["one", "one"]


def test_parse_prompt_text_uses_base_dir(tmp_path):
    write(tmp_path, "from base\n", "n.txt")
    text = 'neutral_prompt_file = "n.txt"\n[[targets]]\ntarget_class = "a"\npositive = "p"\n'
    settings = parse_prompt_text(text, tmp_path, "mine.toml")
    assert [s.neutral for s in settings] == ["from base", "from base"]
    with pytest.raises(UserError, match=r"^mine\.toml: top level: neutral_prompt_file: "):
        parse_prompt_text(text, tmp_path / "nowhere", "mine.toml")


def test_top_level_neutral_does_not_leak_into_prompts(tmp_path):
    settings = load(tmp_path, """
neutral = "top neutral"
resolutions = [768, 1024]

[[prompts]]
target = "a"

[[targets]]
target_class = "b"
positive = "p"
""")
    assert rows(settings) == [
        ("a", "a", "", "", "erase", 1.0, 1.0, (512, 512), 1, 1.0),
        ("b", "p", "", "top neutral", "enhance", 1.0, 1.0, (768, 768), 1, 1.0),
        ("b", "p", "", "top neutral", "erase", -1.0, 1.0, (768, 768), 1, 1.0),
        ("b", "p", "", "top neutral", "enhance", 1.0, 1.0, (1024, 1024), 1, 1.0),
        ("b", "p", "", "top neutral", "erase", -1.0, 1.0, (1024, 1024), 1, 1.0),
    ]


@pytest.mark.parametrize("key, value", [("positive", '"p"'), ("target", '"t"'), ("multiplier", "2.0"),
                                        ("weight", "2.0"), ("action", '"enhance"'), ("unconditional", '""')])
def test_entry_keys_are_not_top_level_defaults(tmp_path, key, value):
    with pytest.raises(UserError) as info:
        load(tmp_path, f'{key} = {value}\n[[prompts]]\ntarget = "a"\n[[targets]]\ntarget_class = "b"\npositive = "p"\n')
    message = str(info.value)
    assert message.startswith("prompts.toml: top level: ")
    assert f"unknown key '{key}'" in message


def test_prompt_file_object(tmp_path):
    path = write(tmp_path, '[[prompts]]\ntarget = "a"\nneutral = "n"\n[[targets]]\ntarget_class = "b"\npositive = "p"\nnegative = "q"\n')
    prompt_file = load_prompt_file(path)
    assert isinstance(prompt_file, PromptFile)
    assert prompt_file.path == path
    assert prompt_file.all_prompts == ["a", "", "n", "b", "p", "q"]
    assert prompt_file.settings[0].as_dict()["resolution"] == [512, 512]
    assert prompt_file.settings[0].prompts == ("a", "a", "", "n")


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UserError, match=r"^--prompts_file: file not found: .*nope\.toml"):
        load_prompt_file(tmp_path / "nope.toml")


def test_non_utf8_prompt_file(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes('[[prompts]]\ntarget = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"^latin\.toml: "):
        load_prompt_file(path)


# ----------------------------------------------------------------------------------------------
# Malformed files. Each case: (TOML, entry location, fragments the message must also contain).
# The entry is checked as "prompts.toml: <entry>: " at the start of the message.

T = '[[targets]]\ntarget_class = "c"\npositive = "p"\n'  # a valid target
P = '[[prompts]]\ntarget = "t"\n'  # a valid prompt

BAD_FILES = {
    "unknown_key_targets_suggestion": (T + T + 'negitive = "n"\n', "[[targets]][2]",
                                       ["unknown key 'negitive'", "did you mean 'negative'?"]),
    "unknown_key_prompts_suggestion": (P + "gudance_scale = 2.0\n", "[[prompts]][1]",
                                       ["unknown key 'gudance_scale'", "did you mean 'guidance_scale'?"]),
    "unknown_key_top_level_suggestion": ("guidence_scale = 2.0\n" + T, "top level",
                                         ["unknown key 'guidence_scale'", "did you mean 'guidance_scale'?"]),
    "unknown_key_no_close_match": (P + "zzz = 1\n", "[[prompts]][1]", ["unknown key 'zzz'", "target"]),
    "negative_in_prompts": (P + 'negative = "n"\n', "[[prompts]][1]", ["unknown key 'negative'"]),
    "target_in_targets": ('[[targets]]\ntarget = "c"\npositive = "p"\n', "[[targets]][1]",
                          ["unknown key 'target'", "did you mean 'target_class'?"]),
    "resolutions_in_prompts": (P + "resolutions = [512]\n", "[[prompts]][1]",
                               ["unknown key 'resolutions'", "did you mean 'resolution'?"]),
    "typo_table_prompt": ('[[prompt]]\ntarget = "t"\n', "top level", ["unknown key 'prompt'", "did you mean 'prompts'?"]),
    "typo_table_target": ('[[target]]\ntarget_class = "c"\npositive = "p"\n', "top level",
                          ["unknown key 'target'", "did you mean 'targets'?"]),
    "top_level_positive": ('positive = "p"\n' + T, "top level", ["unknown key 'positive'"]),
    "missing_target": (P + '[[prompts]]\npositive = "p"\n', "[[prompts]][2]", ["'target'"]),
    "missing_target_class": ('[[targets]]\npositive = "p"\nnegative = "n"\n', "[[targets]][1]", ["'target_class'"]),
    "no_poles": ('[[targets]]\ntarget_class = "c"\nneutral = ""\n', "[[targets]][1]", ["'positive'", "'negative'"]),
    "both_poles_empty": ('[[targets]]\ntarget_class = "c"\npositive = ""\nnegative = ""\n', "[[targets]][1]",
                         ["'positive'", "'negative'"]),
    "string_false_for_bool": (P + 'dynamic_resolution = "false"\n', "[[prompts]][1]", ["dynamic_resolution", "true or false"]),
    "string_for_bool_top_level_shared": ('dynamic_crops = "yes"\n' + T, None, ["dynamic_crops"]),
    "float_batch_size": (P + "batch_size = 1.0\n", "[[prompts]][1]", ["batch_size", "integer"]),
    "bool_for_guidance_scale": (T + "guidance_scale = true\n", "[[targets]][1]", ["guidance_scale", "number"]),
    "bool_for_multiplier": (P + "multiplier = false\n", "[[prompts]][1]", ["multiplier", "number"]),
    "bool_for_batch_size": (T + "batch_size = true\n", "[[targets]][1]", ["batch_size", "integer"]),
    "string_for_weight": (P + 'weight = "1.0"\n', "[[prompts]][1]", ["weight", "number"]),
    "resolution_not_multiple_of_8": (P + "resolution = 500\n", "[[prompts]][1]", ["resolution", "500"]),
    "resolution_zero": (T + "resolution = 0\n", "[[targets]][1]", ["resolution"]),
    "resolution_negative": (P + "resolution = -512\n", "[[prompts]][1]", ["resolution", "-512"]),
    "resolution_three_items": (P + "resolution = [512, 512, 512]\n", "[[prompts]][1]", ["resolution", "3"]),
    "resolution_one_item": (T + "resolution = [512]\n", "[[targets]][1]", ["resolution"]),
    "resolution_string": (P + 'resolution = "512"\n', "[[prompts]][1]", ["resolution"]),
    "resolution_float": (P + "resolution = 512.0\n", "[[prompts]][1]", ["resolution"]),
    "resolution_pair_bad_width": (T + "resolution = [512, 500]\n", "[[targets]][1]", ["resolution", "500"]),
    "resolution_inf": (P + "resolution = inf\n", "[[prompts]][1]", ["resolution"]),
    "resolutions_bad_item": (T + "resolutions = [512, 1020]\n", "[[targets]][1]", ["resolutions", "1020"]),
    "resolutions_empty": (T + "resolutions = []\n", "[[targets]][1]", ["resolutions"]),
    "resolutions_not_a_list": (T + "resolutions = 512\n", "[[targets]][1]", ["resolutions"]),
    "batch_size_zero": (P + "batch_size = 0\n", "[[prompts]][1]", ["batch_size", ">= 1"]),
    "batch_size_negative": (T + "batch_size = -2\n", "[[targets]][1]", ["batch_size"]),
    "guidance_scale_negative": (P + "guidance_scale = -1.0\n", "[[prompts]][1]", ["guidance_scale", ">= 0"]),
    "multiplier_zero_targets": (T + "multiplier = 0\n", "[[targets]][1]", ["multiplier"]),
    "multiplier_zero_prompts": (P + "multiplier = 0.0\n", "[[prompts]][1]", ["multiplier"]),
    "weight_zero": (T + "weight = 0\n", "[[targets]][1]", ["weight"]),
    "weight_negative": (P + "weight = -1.0\n", "[[prompts]][1]", ["weight"]),
    "guidance_scale_nan": (P + "guidance_scale = nan\n", "[[prompts]][1]", ["guidance_scale", "finite"]),
    "multiplier_inf": (T + "multiplier = inf\n", "[[targets]][1]", ["multiplier", "finite"]),
    "weight_minus_inf": (P + "weight = -inf\n", "[[prompts]][1]", ["weight"]),
    "multiplier_nan": (P + "multiplier = nan\n", "[[prompts]][1]", ["multiplier", "finite"]),
    "action_swap": (P + 'action = "swap"\n', "[[prompts]][1]", ["action", "'swap'", "erase", "enhance"]),
    "action_typo_suggestion": (P + 'action = "erace"\n', "[[prompts]][1]", ["action", "did you mean 'erase'?"]),
    "action_not_string": (P + "action = 1\n", "[[prompts]][1]", ["action"]),
    "resolution_and_resolutions_entry": (T + "resolution = 512\nresolutions = [512]\n", "[[targets]][1]", ["resolutions"]),
    "resolution_and_resolutions_top": ("resolution = 512\nresolutions = [512]\n" + T, "top level", ["resolutions"]),
    "targets_empty_array": ("targets = []\n", "top level", ["[[targets]]", "empty"]),
    "prompts_empty_array": ("prompts = []\n", "top level", ["[[prompts]]", "empty"]),
    "no_entries": ("guidance_scale = 1.0\n", "top level", ["[[prompts]]", "[[targets]]"]),
    "empty_file": ("", "top level", ["[[prompts]]", "[[targets]]"]),
    "empty_targets_table": ("[[targets]]\n", "[[targets]][1]", ["'target_class'"]),
    "neutrals_not_a_list": (T + 'neutrals = "a"\n', "[[targets]][1]", ["neutrals"]),
    "neutrals_empty_list": (T + "neutrals = []\n", "[[targets]][1]", ["neutrals"]),
    "neutrals_list_of_ints": (T + "neutrals = [1, 2]\n", "[[targets]][1]", ["neutrals"]),
    "neutrals_top_level_empty": ("neutrals = []\n" + T, "top level", ["neutrals"]),
    "neutral_not_a_string": (T + "neutral = 5\n", "[[targets]][1]", ["neutral"]),
    "neutral_prompt_file_missing": (T + 'neutral_prompt_file = "missing.txt"\n', "[[targets]][1]",
                                    ["neutral_prompt_file", "missing.txt"]),
    "neutral_prompt_file_empty": ('neutral_prompt_file = "empty.txt"\n' + T, "top level", ["neutral_prompt_file", "empty.txt"]),
    "neutral_prompt_file_only_comments": (T + 'neutral_prompt_file = "comments.txt"\n', "[[targets]][1]",
                                          ["neutral_prompt_file", "comments.txt"]),
    "neutral_prompt_file_not_a_string": (T + "neutral_prompt_file = 1\n", "[[targets]][1]", ["neutral_prompt_file"]),
    "top_level_neutral_prompts_only": ('neutral = "n"\n' + P, "top level", ["'neutral'", "[[targets]]"]),
    "top_level_neutrals_prompts_only": ('neutrals = ["n"]\n' + P, "top level", ["'neutrals'", "[[targets]]"]),
    "top_level_neutral_file_prompts_only": ('neutral_prompt_file = "n.txt"\n' + P, "top level",
                                            ["'neutral_prompt_file'", "[[targets]]"]),
    "top_level_resolutions_prompts_only": ("resolutions = [512]\n" + P, "top level", ["'resolutions'", "[[targets]]"]),
    "invalid_toml": (P + "[[prompts]\n", None, ["invalid TOML", "line 3"]),
    "invalid_toml_value": ('[[prompts]]\ntarget = van gogh\n', None, ["invalid TOML", "line 2"]),
    "prompts_is_a_string": ('prompts = "x"\n', "top level", ["prompts", "[[prompts]]"]),
    "prompts_single_table": ('[prompts]\ntarget = "t"\n', "top level", ["[[prompts]]"]),
    "targets_list_of_strings": ('targets = ["a"]\n', "top level", ["[[targets]]"]),
    "target_not_a_string": ("[[prompts]]\ntarget = 5\n", "[[prompts]][1]", ["target"]),
    "target_class_not_a_string": ('[[targets]]\ntarget_class = ["c"]\npositive = "p"\n', "[[targets]][1]", ["target_class"]),
    "positive_not_a_string": (P + "positive = 1\n", "[[prompts]][1]", ["positive"]),
    "negative_not_a_string": ('[[targets]]\ntarget_class = "c"\nnegative = false\n', "[[targets]][1]", ["negative"]),
    "unconditional_not_a_string": (P + "unconditional = false\n", "[[prompts]][1]", ["unconditional"]),
    "error_in_third_entry": (P + P + P + "batch_size = 0\n", "[[prompts]][3]", ["batch_size"]),
    # contexts and preserve anchors (issue 12)
    "context_without_slot": (P + 'contexts = ["{}", "a large square"]\n', "[[prompts]][1]",
                             ["contexts", "'a large square'", "no '{}'"]),
    "context_with_two_slots": (P + 'contexts = ["{} and {}"]\n', "[[prompts]][1]", ["contexts", "'{} and {}'", "2 '{}'"]),
    "context_top_level_without_slot": ('contexts = ["in a forest"]\n' + P, "top level", ["contexts", "'in a forest'"]),
    "contexts_empty_list": (P + "contexts = []\n", "[[prompts]][1]", ["contexts", "non-empty"]),
    "contexts_not_a_list": (P + 'contexts = "{} in a forest"\n', "[[prompts]][1]", ["contexts", "array"]),
    "contexts_list_of_ints": (P + "contexts = [1]\n", "[[prompts]][1]", ["contexts", "1"]),
    "context_file_line_without_slot": (P + 'context_prompt_file = "n.txt"\n', "[[prompts]][1]",
                                       ["context_prompt_file", "n.txt line 1", "'n'", "no '{}'"]),
    "context_file_missing": (P + 'context_prompt_file = "missing.txt"\n', "[[prompts]][1]",
                             ["context_prompt_file", "missing.txt"]),
    "context_file_only_comments": ('context_prompt_file = "comments.txt"\n' + P, "top level",
                                   ["context_prompt_file", "comments.txt", "no contexts"]),
    "context_file_not_a_string": (P + "context_prompt_file = 3\n", "[[prompts]][1]", ["context_prompt_file"]),
    "contexts_in_targets": (T + 'contexts = ["{}"]\n', "[[targets]][1]", ["unknown key 'contexts'"]),
    "top_level_contexts_targets_only": ('contexts = ["a {}"]\n' + T, "top level", ["'contexts'", "[[prompts]] only"]),
    "preserve_with_positive": (P + 'action = "preserve"\npositive = "p"\n', "[[prompts]][1]", ["positive", "preserve"]),
    "preserve_with_guidance_scale": (P + 'action = "preserve"\nguidance_scale = 2.0\n', "[[prompts]][1]",
                                     ["guidance_scale", "preserve"]),
    "action_preserve_typo": (P + 'action = "preserv"\n', "[[prompts]][1]", ["action", "did you mean 'preserve'?"]),
    "anchors_not_a_list": (P + 'anchors = ""\n', "[[prompts]][1]", ["anchors", "array"]),
    "anchors_empty_list": (P + "anchors = []\n", "[[prompts]][1]", ["anchors", "non-empty"]),
    "anchors_list_of_ints": (P + "anchors = [2]\n", "[[prompts]][1]", ["anchors", "2"]),
    "anchor_is_the_target": (P + 'anchors = ["", "t"]\n', "[[prompts]][1]", ["anchors", "'t'", "target"]),
    "anchors_top_level_bad": ("anchors = [1]\n" + P, "top level", ["anchors"]),
    "anchor_weight_zero": (P + 'anchors = [""]\nanchor_weight = 0\n', "[[prompts]][1]", ["anchor_weight", "> 0"]),
    "anchor_weight_string": (P + 'anchors = [""]\nanchor_weight = "2"\n', "[[prompts]][1]", ["anchor_weight", "number"]),
    "anchor_weight_nan": ("anchor_weight = nan\n" + P, "top level", ["anchor_weight", "finite"]),
    "anchor_weight_without_anchors": (P + "anchor_weight = 2.0\n", "[[prompts]][1]", ["anchor_weight", "'anchors'"]),
    "anchors_in_preserve_entry": (P + 'action = "preserve"\nanchors = [""]\n', "[[prompts]][1]", ["anchors", "preserve"]),
    "anchors_in_targets": (T + 'anchors = [""]\n', "[[targets]][1]", ["unknown key 'anchors'"]),
    "top_level_anchors_targets_only": ('anchors = [""]\n' + T, "top level", ["'anchors'", "[[prompts]] only"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_malformed_prompt_file(name, tmp_path, tiny_sd_dir, capsys, no_training):
    """Through ``train_leco.main`` as a user runs it: exit 2 and one line naming file, entry and key,
    before any model is loaded."""
    import train_leco

    text, entry, fragments = BAD_FILES[name]
    write(tmp_path, "", "empty.txt")
    write(tmp_path, "# nothing\n\n   \n# here\n", "comments.txt")
    write(tmp_path, "n\n", "n.txt")
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--prompts_file", str(write(tmp_path, text)),
            "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert train_leco.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    message = lines[0].removeprefix("error: ")
    assert lines[0].startswith("error: prompts.toml: "), message
    if entry is not None:
        assert message.startswith(f"prompts.toml: {entry}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", [
    "guidance_scale = -1.0\n" + T,
    "resolution = 1020\n" + P,
    "batch_size = 0\n" + T,
])
def test_bad_top_level_default_is_reported_at_top_level(tmp_path, text):
    with pytest.raises(UserError) as info:
        load_prompt_file(write(tmp_path, text))
    assert str(info.value).startswith("prompts.toml: top level: ")


DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _toml_blocks(markdown: Path) -> list[str]:
    import re

    return re.findall(r"```toml\n(.*?)```", markdown.read_text(encoding="utf-8"), re.S)


def test_every_prompt_file_in_the_docs_and_examples_parses(tmp_path):
    """What users copy must work: the user guide's TOML blocks and every file in examples/."""
    import tomllib

    from library.cli import setup_parser
    from library.config_file import read_config_file

    blocks = _toml_blocks(DOCS / "train_leco.md")
    prompt_blocks = [block for block in blocks if "[[prompts]]" in block or "[[targets]]" in block]
    assert len(prompt_blocks) >= 8
    for block in prompt_blocks:  # neutral_prompt_file = "neutrals.txt" resolves against examples/
        assert parse_prompt_text(block, EXAMPLES, "docs block")
    config_blocks = [block for block in blocks if block not in prompt_blocks]
    assert config_blocks
    for index, block in enumerate(config_blocks):
        path = tmp_path / f"config-{index}.toml"
        path.write_text(block, encoding="utf-8")
        assert read_config_file(str(path), setup_parser("sd"))
    for example in sorted(EXAMPLES.glob("*.toml")):
        text = example.read_text(encoding="utf-8")
        if "[[prompts]]" in text or "[[targets]]" in text:
            assert load_prompt_file(example).settings, example.name
        else:  # a --config_file example
            assert tomllib.loads(text) and read_config_file(str(example), setup_parser("sd"))
