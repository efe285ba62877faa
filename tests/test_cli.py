"""The command line of ``train_leco.py`` / ``sdxl_train_leco.py``: --help, defaults, a corpus of bad
flags (each one error line, exit 2, before any model is loaded), --config_file / --output_config,
optimizer/network key=value arguments and the sample prompt file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdxl_train_leco
import train_leco
from library.cli import (
    build_run_config,
    effective_args,
    parse_namespace,
    read_config_file,
    setup_parser,
    write_config_file,
)
from library.errors import UserError
from library.optimizers import literal_values, parse_key_values
from library.sample_prompts import SamplePrompt, load_sample_prompts, parse_sample_line

ROOT = Path(__file__).resolve().parents[1]

HELP_FLAGS = """
--pretrained_model_name_or_path --v2 --v_parameterization --prompts_file --output_dir --output_name
--network_module --network_dim --network_alpha --network_dropout --network_args --network_weights
--max_train_steps --learning_rate --optimizer_type --optimizer_args --lr_scheduler --lr_warmup_steps
--max_denoising_steps --leco_denoise_guidance_scale --save_every_n_steps --save_precision --save_model_as
--mixed_precision --full_bf16 --full_fp16 --gradient_checkpointing --gradient_accumulation_steps
--max_grad_norm --sdpa --xformers --seed --clip_skip --max_token_length --min_snr_gamma --loss_type
--logging_dir --log_with --log_prefix --training_comment --config_file --output_config --save_state --resume
""".split()

VALID_PROMPTS = '[[targets]]\ntarget_class = "1girl"\npositive = "1girl, long hair"\nnegative = "1girl, short hair"\n'

SCRIPTS = {"sd": train_leco, "sdxl": sdxl_train_leco}


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "prompts.toml").write_text(VALID_PROMPTS, encoding="utf-8")
    (tmp_path / "samples.txt").write_text("a girl --n blurry --s 4\n", encoding="utf-8")
    return tmp_path


@pytest.fixture
def model_dirs(tiny_sd_dir, tiny_sdxl_dir) -> dict[str, Path]:
    return {"sd": tiny_sd_dir, "sdxl": tiny_sdxl_dir}


def base_args(model: Path, workdir: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--prompts_file", str(workdir / "prompts.toml"),
        "--output_dir", str(workdir / "out"),
    ]


def drop(args: list[str], flag: str) -> list[str]:
    index = args.index(flag)
    return args[:index] + args[index + 2:]


# ----------------------------------------------------------------------------------------------
# --help and defaults


@pytest.mark.parametrize("script", ["train_leco.py", "sdxl_train_leco.py"])
def test_help_lists_every_flag(script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    words = set(result.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split())
    missing = [flag for flag in HELP_FLAGS if flag not in words]
    assert not missing, f"{script} --help lacks {missing}"
    # Flags LECO rejects (epochs, image datasets) are accepted only to explain; they are not advertised.
    for hidden in ("--max_train_epochs", "--save_every_n_epochs", "--train_batch_size", "--dataset_config"):
        assert hidden not in words
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_parser_defaults(family):
    for parser in (setup_parser(family), SCRIPTS[family].setup_parser()):
        args = parser.parse_args([])
        assert args.max_denoising_steps == 40
        assert args.leco_denoise_guidance_scale == 3.0
        assert args.network_module == "networks.lora"
        assert args.optimizer_type == "AdamW"
        assert args.save_model_as == "safetensors"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_base_args_are_valid(family, model_dirs, workdir):
    """The bad-flag cases below differ from these arguments only by the flag under test."""
    args, _ = parse_namespace(base_args(model_dirs[family], workdir), family)
    config = build_run_config(args, family)
    assert config.model.family == family
    assert len(config.prompts.settings) == 2
    args, _ = parse_namespace(base_args(model_dirs[family], workdir)
                              + ["--sample_prompts", str(workdir / "samples.txt"), "--sample_every_n_steps", "5"], family)
    assert build_run_config(args, family).sample.prompts[0].negative == "blurry"


def test_help_through_main_returns_0(capsys):
    assert train_leco.main(["--help"]) == 0
    assert "--prompts_file" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Bad flags: (family, extra args or a function of the base args, fragments the error must contain)


def write_file(name: str, text: str):
    def make(workdir: Path) -> str:
        path = workdir / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    return make


BAD_CASES = {
    "max_train_epochs": ("sd", ["--max_train_epochs", "10"], ["--max_train_epochs", "--max_train_steps"]),
    "save_every_n_epochs": ("sd", ["--save_every_n_epochs", "1"], ["--save_every_n_epochs", "--save_every_n_steps"]),
    "train_batch_size": ("sdxl", ["--train_batch_size", "2"], ["--train_batch_size", "batch_size"]),
    "dataset_config": ("sd", ["--dataset_config", "d.toml"], ["--dataset_config"]),
    "unknown_flag": ("sd", ["--foo_bar", "1"], ["--foo_bar"]),
    "typo_flag": ("sdxl", ["--learning_rat", "1e-4"], ["--learning_rat"]),
    "missing_prompts_file": ("sd", lambda a, w: drop(a, "--prompts_file"), ["--prompts_file"]),
    "missing_output_dir": ("sdxl", lambda a, w: drop(a, "--output_dir"), ["--output_dir"]),
    "missing_model": ("sd", lambda a, w: drop(a, "--pretrained_model_name_or_path"), ["--pretrained_model_name_or_path"]),
    "nonexistent_model_file": ("sd", lambda a, w: drop(a, "--pretrained_model_name_or_path")
                               + ["--pretrained_model_name_or_path", str(w / "nope.safetensors")],
                               ["--pretrained_model_name_or_path", "nope.safetensors"]),
    "nonexistent_model_folder": ("sdxl", lambda a, w: drop(a, "--pretrained_model_name_or_path")
                                 + ["--pretrained_model_name_or_path", str(w / "no" / "such" / "model")],
                                 ["--pretrained_model_name_or_path"]),
    "prompts_file_missing": ("sd", lambda a, w: drop(a, "--prompts_file") + ["--prompts_file", str(w / "nope.toml")],
                             ["--prompts_file", "nope.toml"]),
    "mixed_precision_choice": ("sd", ["--mixed_precision", "fp32"], ["--mixed_precision", "fp32"]),
    "full_bf16_without_bf16": ("sd", ["--full_bf16"], ["--full_bf16", "bf16"]),
    "full_bf16_with_fp16": ("sdxl", ["--full_bf16", "--mixed_precision", "fp16"], ["--full_bf16"]),
    "full_fp16_with_bf16": ("sd", ["--full_fp16", "--mixed_precision", "bf16"], ["--full_fp16"]),
    "max_denoising_steps_1": ("sd", ["--max_denoising_steps", "1"], ["--max_denoising_steps"]),
    "max_denoising_steps_text": ("sd", ["--max_denoising_steps", "forty"], ["--max_denoising_steps"]),
    "learning_rate_text": ("sd", ["--learning_rate", "abc"], ["--learning_rate", "abc"]),
    "learning_rate_zero": ("sdxl", ["--learning_rate", "0"], ["--learning_rate"]),
    "learning_rate_nan": ("sd", ["--learning_rate", "nan"], ["--learning_rate"]),
    "network_dim_negative": ("sd", ["--network_dim", "-4"], ["--network_dim"]),
    "network_dim_zero": ("sdxl", ["--network_dim", "0"], ["--network_dim"]),
    "network_dim_float": ("sd", ["--network_dim", "4.5"], ["--network_dim"]),
    "max_train_steps_zero": ("sd", ["--max_train_steps", "0"], ["--max_train_steps"]),
    "network_dropout_1_5": ("sd", ["--network_dropout", "1.5"], ["--network_dropout"]),
    "network_args_without_equals": ("sd", ["--network_args", "conv_dim"], ["--network_args", "conv_dim"]),
    "optimizer_type_unknown": ("sd", ["--optimizer_type", "AdamW9bit"], ["--optimizer_type", "AdamW9bit", "did you mean"]),
    "optimizer_type_bad_path": ("sdxl", ["--optimizer_type", "no_such_pkg.Opt"], ["--optimizer_type", "no_such_pkg"]),
    "optimizer_args_without_equals": ("sd", ["--optimizer_args", "weight_decay"], ["--optimizer_args", "weight_decay"]),
    "optimizer_args_empty_key": ("sdxl", ["--optimizer_args", "=0.1"], ["--optimizer_args"]),
    "lr_scheduler_choice": ("sd", ["--lr_scheduler", "cosine_annealing"], ["--lr_scheduler"]),
    "lr_warmup_steps_fractional": ("sd", ["--lr_warmup_steps", "2.5"], ["--lr_warmup_steps"]),
    "v2_with_sdxl": ("sdxl", ["--v2"], ["--v2", "sdxl_train_leco.py"]),
    "clip_skip_with_sdxl": ("sdxl", ["--clip_skip", "2"], ["--clip_skip"]),
    "clip_skip_zero": ("sd", ["--clip_skip", "0"], ["--clip_skip"]),
    "max_token_length_choice": ("sd", ["--max_token_length", "100"], ["--max_token_length"]),
    "dim_from_weights_without_weights": ("sd", ["--dim_from_weights"], ["--dim_from_weights", "--network_weights"]),
    "network_weights_missing": ("sd", lambda a, w: a + ["--network_weights", str(w / "nope.safetensors")],
                                ["--network_weights", "nope.safetensors"]),
    "sample_every_without_prompts": ("sd", ["--sample_every_n_steps", "10"], ["--sample_every_n_steps", "--sample_prompts"]),
    "sample_prompts_missing": ("sdxl", lambda a, w: a + ["--sample_prompts", str(w / "nope.txt")],
                               ["--sample_prompts", "nope.txt"]),
    "sample_prompts_toml": ("sd", lambda a, w: a + ["--sample_prompts", str(w / "prompts.toml")],
                            ["--sample_prompts", "prompts.toml"]),
    "sample_prompt_bad_option": ("sd", lambda a, w: a + ["--sample_prompts", write_file("bad.txt", "a\n\na girl --q 3\n")(w)],
                                 ["bad.txt:3", "--q"]),
    "sample_prompt_bad_size": ("sdxl", lambda a, w: a + ["--sample_prompts", write_file("bad.txt", "a girl --w 500\n")(w)],
                               ["bad.txt:1", "--w", "500"]),
    "sample_multipliers_text": ("sd", ["--sample_multipliers", "a,b"], ["--sample_multipliers"]),
    "sample_multipliers_empty": ("sd", ["--sample_multipliers", ","], ["--sample_multipliers"]),
    "sample_multipliers_inf": ("sd", ["--sample_multipliers", "1,inf"], ["--sample_multipliers"]),
    "log_with_tensorboard_no_dir": ("sd", ["--log_with", "tensorboard"], ["--log_with", "--logging_dir"]),
    "log_with_choice": ("sd", ["--log_with", "mlflow"], ["--log_with"]),
    "resume_missing": ("sd", lambda a, w: a + ["--resume", str(w / "no_state")], ["--resume", "no_state"]),
    "save_state_ckpt": ("sd", ["--save_state", "--save_model_as", "ckpt"], ["--save_state", "safetensors"]),
    "save_precision_choice": ("sd", ["--save_precision", "fp8"], ["--save_precision"]),
    "malformed_prompt_file": ("sdxl", lambda a, w: drop(a, "--prompts_file")
                              + ["--prompts_file", write_file("p.toml", VALID_PROMPTS + 'negitive = "x"\n')(w)],
                              ["p.toml: [[targets]][1]: unknown key 'negitive'", "did you mean 'negative'?"]),
    "network_module_missing": ("sd", ["--network_module", "no_such_networks.lora"], ["--network_module", "no_such_networks.lora"]),
    "network_module_missing_top": ("sd", ["--network_module", "no_such_module_xyz"], ["--network_module"]),
    "output_config_without_config_file": ("sd", ["--output_config"], ["--output_config", "--config_file"]),
    "config_file_missing": ("sd", lambda a, w: a + ["--config_file", str(w / "nope.toml")], ["--config_file", "nope.toml"]),
    "xformers_on_cpu": ("sd", ["--xformers"], ["--xformers"]),
    "sdpa_and_xformers": ("sd", ["--sdpa", "--xformers"], ["--sdpa", "--xformers", "choose one"]),
    "optimizer_args_bad_betas": ("sd", ["--optimizer_args", "betas=0.9,1.5"], ["--optimizer_args", "AdamW", "beta"]),
    "optimizer_args_negative_eps": ("sdxl", ["--optimizer_args", "eps=-1"], ["--optimizer_args", "eps"]),
    "optimizer_args_unknown_keyword": ("sd", ["--optimizer_args", "momentum_x=0.9"], ["--optimizer_args", "momentum_x"]),
    "network_weights_corrupt": ("sd", lambda a, w: a + ["--network_weights", write_file("bad.safetensors", "not a tensor file")(w)],
                                ["--network_weights", "bad.safetensors", "not a readable LoRA file"]),
    "network_weights_not_lora": ("sd", lambda a, w: a + ["--network_weights", str(write_tensors(w / "model.safetensors"))],
                                 ["--network_weights", "no kohya LoRA keys", "model.diffusion_model.x"]),
    "resume_not_a_state_folder": ("sd", lambda a, w: a + ["--resume", str(w)], ["--resume", "not a training state folder"]),
    "zero_terminal_snr_epsilon_single_file": ("sd", lambda a, w: drop(a, "--pretrained_model_name_or_path")
                                              + ["--pretrained_model_name_or_path", str(write_tensors(w / "m.safetensors")),
                                                 "--zero_terminal_snr"],
                                              ["--zero_terminal_snr", "v-prediction", "--v_parameterization"]),
    "neutral_file_not_utf8": ("sd", lambda a, w: drop(a, "--prompts_file") + ["--prompts_file", write_neutral_file_case(w)],
                              ["n.toml: top level: neutral_prompt_file", "not a UTF-8 text file"]),
}


def write_tensors(path: Path) -> Path:
    """A valid .safetensors file that is not a LoRA (one original-layout checkpoint key)."""
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(path))
    return path


def write_neutral_file_case(workdir: Path) -> str:
    (workdir / "latin1.txt").write_bytes("caf\xe9 photo\n".encode("latin-1"))
    return write_file("n.toml", 'neutral_prompt_file = "latin1.txt"\n[[targets]]\ntarget_class = "a"\npositive = "b"\n')(workdir)


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_flags(name, model_dirs, workdir, capsys, no_training):
    family, extra, fragments = BAD_CASES[name]
    if name == "xformers_on_cpu" and importlib.util.find_spec("xformers") and torch.cuda.is_available():
        pytest.skip("xformers is usable on this machine")
    argv = base_args(model_dirs[family], workdir)
    argv = extra(argv, workdir) if callable(extra) else argv + extra
    capsys.readouterr()
    code = SCRIPTS[family].main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert not (workdir / "out").exists()


def test_sample_multipliers_with_equals_sign(tiny_sd_dir, workdir):
    args, _ = parse_namespace(base_args(tiny_sd_dir, workdir) + ["--sample_multipliers=-1,0.5,1"], "sd")
    assert build_run_config(args, "sd").sample.multipliers == (-1.0, 0.5, 1.0)


def test_sample_multipliers_starting_with_minus(tiny_sd_dir, workdir):
    """argparse would read ``-1,0,1`` as a flag; the CLI joins it to ``--sample_multipliers``."""
    args, _ = parse_namespace(base_args(tiny_sd_dir, workdir) + ["--sample_multipliers", "-1,0,1"], "sd")
    assert build_run_config(args, "sd").sample.multipliers == (-1.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# --config_file / --output_config

CONFIG_NAME = "leco_config.toml"


def toml_string(value) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def config_text(model: Path, workdir: Path, top: str = "", sections: str = "") -> str:
    """A valid flag TOML (top-level keys, then [model] / [training] sections) plus ``top``/``sections``."""
    return (
        f"prompts_file = {toml_string(workdir / 'prompts.toml')}\n"
        f"output_dir = {toml_string(workdir / 'out')}\n"
        f"{top}"
        "[model]\n"
        f"pretrained_model_name_or_path = {toml_string(model)}\n"
        "clip_skip = 2\n"
        "[training]\n"
        "network_dim = 8\n"
        "learning_rate = 3e-4\n"
        "max_train_steps = 20\n"
        "gradient_checkpointing = true\n"
        'network_args = ["conv_dim=4", "conv_alpha=1"]\n'
        'mixed_precision = "no"\n'
        f"{sections}"
    )


def test_config_file_supplies_flags(tiny_sd_dir, workdir, capsys, no_training):
    path = workdir / CONFIG_NAME
    path.write_text(config_text(tiny_sd_dir, workdir), encoding="utf-8")
    args, _ = parse_namespace(["--config_file", str(path)], "sd")
    config = build_run_config(args, "sd")
    assert config.model.path == str(tiny_sd_dir)
    assert config.model.clip_skip == 2
    assert config.network.dim == 8
    assert config.network.args == {"conv_dim": "4", "conv_alpha": "1"}
    assert config.optimizer.learning_rate == 3e-4
    assert config.train.max_train_steps == 20
    assert config.train.gradient_checkpointing is True
    assert config.output.output_dir == str(workdir / "out")
    assert len(config.prompts.settings) == 2
    # Through main(): the file alone gets past validation (and would start training).
    with pytest.raises(AssertionError, match="training started"):
        train_leco.main(["--config_file", str(path)])
    assert capsys.readouterr().err.count("error:") == 0


def test_command_line_wins_over_config_file(tiny_sd_dir, workdir):
    path = workdir / CONFIG_NAME
    path.write_text(config_text(tiny_sd_dir, workdir), encoding="utf-8")
    args, _ = parse_namespace(["--config_file", str(path), "--network_dim", "16", "--max_train_steps", "5",
                               "--network_args", "conv_dim=2", "--output_name", "from_cli"], "sd")
    config = build_run_config(args, "sd")
    assert config.network.dim == 16
    assert config.train.max_train_steps == 5
    assert config.network.args == {"conv_dim": "2"}
    assert config.output.output_name == "from_cli"
    assert config.optimizer.learning_rate == 3e-4  # not on the command line: from the file
    # The order of --config_file among the flags does not matter.
    args, _ = parse_namespace(["--network_dim", "16", "--config_file", str(path)], "sd")
    assert args.network_dim == 16


def test_config_file_without_toml_suffix(tiny_sd_dir, workdir, no_training):
    (workdir / CONFIG_NAME).write_text(config_text(tiny_sd_dir, workdir), encoding="utf-8")
    stem = str(workdir / CONFIG_NAME.removesuffix(".toml"))
    args, _ = parse_namespace(["--config_file", stem], "sd")
    assert args.network_dim == 8
    assert read_config_file(stem, setup_parser("sd"))["max_train_steps"] == 20
    with pytest.raises(AssertionError, match="training started"):
        train_leco.main(["--config_file", stem])


def test_config_file_values_are_typed(tiny_sd_dir, workdir):
    path = workdir / CONFIG_NAME
    path.write_text(config_text(tiny_sd_dir, workdir, top="lr_warmup_steps = 5\nmax_token_length = 150\n"
                                                        "optimizer_args = \"weight_decay=0.01\"\n"), encoding="utf-8")
    values = read_config_file(str(path), setup_parser("sd"))
    assert values["network_dim"] == 8 and isinstance(values["network_dim"], int)
    assert values["lr_warmup_steps"] == 5.0 and isinstance(values["lr_warmup_steps"], float)
    assert values["max_token_length"] == 150
    assert values["optimizer_args"] == ["weight_decay=0.01"]  # a single string for a list flag
    assert values["gradient_checkpointing"] is True


# name: (text added at the top level, text added after the sections, fragments the error must contain).
# A text of None means the config file is not written at all.
BAD_CONFIGS = {
    "unknown_key": ("learning_rat = 1e-4\n", "", [CONFIG_NAME, "learning_rat", "did you mean 'learning_rate'?"]),
    "unknown_key_in_section": ("", "seeed = 3\n", [CONFIG_NAME, "seeed", "did you mean 'seed'?"]),
    "set_twice": ("network_dim = 4\n", "", [CONFIG_NAME, "network_dim", "twice"]),
    "config_file_inside": ('config_file = "other.toml"\n', "", [CONFIG_NAME, "config_file"]),
    "output_config_inside": ("output_config = true\n", "", [CONFIG_NAME, "output_config"]),
    "string_true_for_bool": ('v_parameterization = "true"\n', "", [CONFIG_NAME, "v_parameterization", "true or false"]),
    "quoted_number": ("", 'seed = "8"\n', [CONFIG_NAME, "seed", "without quotes"]),
    "quoted_number_network_dim": ("", "", [CONFIG_NAME, "network_dim", "without quotes"]),  # see _bad_config_text
    "float_for_int": ("", "", [CONFIG_NAME, "max_train_steps", "integer"]),  # see _bad_config_text
    "bool_for_number": ("max_grad_norm = true\n", "", [CONFIG_NAME, "max_grad_norm", "number"]),
    "list_for_single_value": ('output_name = ["a", "b"]\n', "", [CONFIG_NAME, "output_name", "single value"]),
    "nested_table": ("", "[training.extra]\nx = 1\n", [CONFIG_NAME, "extra"]),
    "bad_choice": ("", "", [CONFIG_NAME, "mixed_precision", "fp8"]),  # see _bad_config_text
    "bad_int_choice": ("max_token_length = 100\n", "", [CONFIG_NAME, "max_token_length", "100"]),
    "out_of_range": ("", "", [CONFIG_NAME, "network_dim", ">= 1"]),  # see _bad_config_text
    "negative_learning_rate": ("", "", [CONFIG_NAME, "learning_rate", "> 0"]),  # see _bad_config_text
    "invalid_toml": ("network_alpha = = 1\n", "", [CONFIG_NAME, "invalid TOML"]),
    "missing_config_file": (None, None, ["--config_file", "nope.toml", "not found"]),
    "rejected_flag_max_train_epochs": ("max_train_epochs = 3\n", "", ["--max_train_epochs", "--max_train_steps"]),
    "rejected_flag_save_every_n_epochs": ("save_every_n_epochs = 1\n", "", ["--save_every_n_epochs", "--save_every_n_steps"]),
    "bad_combination_in_file": ("full_bf16 = true\n", "", ["--full_bf16", "bf16"]),
}

# Cases that change a key config_text already sets: (key line to replace, replacement).
REPLACED_LINES = {
    "quoted_number_network_dim": ("network_dim = 8\n", 'network_dim = "8"\n'),
    "float_for_int": ("max_train_steps = 20\n", "max_train_steps = 10.5\n"),
    "bad_choice": ('mixed_precision = "no"\n', 'mixed_precision = "fp8"\n'),
    "out_of_range": ("network_dim = 8\n", "network_dim = 0\n"),
    "negative_learning_rate": ("learning_rate = 3e-4\n", "learning_rate = -3e-4\n"),
}


def _bad_config_text(name: str, model: Path, workdir: Path) -> str | None:
    top, sections, _ = BAD_CONFIGS[name]
    if top is None:
        return None
    text = config_text(model, workdir, top, sections)
    if name in REPLACED_LINES:
        old, new = REPLACED_LINES[name]
        assert text.count(old) == 1
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_files(name, tiny_sd_dir, workdir, capsys, no_training):
    fragments = BAD_CONFIGS[name][2]
    text = _bad_config_text(name, tiny_sd_dir, workdir)
    path = workdir / (CONFIG_NAME if text is not None else "nope.toml")
    if text is not None:
        path.write_text(text, encoding="utf-8")
    capsys.readouterr()
    code = train_leco.main(["--config_file", str(path)])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in captured.err + captured.out
    assert not (workdir / "out").exists()


def test_config_key_set_twice_with_dash_spelling(tiny_sd_dir, workdir):
    path = workdir / CONFIG_NAME
    path.write_text(config_text(tiny_sd_dir, workdir, top="network-dim = 4\n"), encoding="utf-8")
    with pytest.raises(UserError, match="twice"):
        read_config_file(str(path), setup_parser("sd"))


TRICKY_COMMENT = 'say "hi" \\ C:\\path\\ \'single\' — ünïcödé 🎉 tab\there\nsecond line [x] = # not a comment'


def test_output_config_round_trip(tiny_sd_dir, workdir, capsys):
    argv = base_args(tiny_sd_dir, workdir) + [
        "--network_dim", "8", "--network_alpha", "4", "--learning_rate", "3e-4", "--lr_warmup_steps", "0.1",
        "--network_args", "conv_dim=4", "conv_alpha=1", "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.99",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--full_bf16", "--seed", "42",
        "--sample_multipliers", "-2,0,2", "--max_token_length", "150", "--training_comment", TRICKY_COMMENT,
    ]
    out = workdir / "configs" / "run.toml"
    before = set(workdir.rglob("*"))
    code = train_leco.main(argv + ["--output_config", "--config_file", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert str(out) in captured.out
    assert captured.err == ""
    assert set(workdir.rglob("*")) - before == {out.parent, out}  # the config and nothing else
    assert not (workdir / "out").exists()

    original, _ = parse_namespace(argv, "sd")
    restored, _ = parse_namespace(["--config_file", str(out)], "sd")
    assert effective_args(restored) == effective_args(original)
    assert restored.training_comment == TRICKY_COMMENT
    config = build_run_config(restored, "sd")
    assert config.sample.multipliers == (-2.0, 0.0, 2.0)
    assert config.optimizer.optimizer_args == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    # The written file holds no config-file plumbing and no rejected flags.
    keys = set(read_config_file(str(out), setup_parser("sd")))
    assert not keys & {"config_file", "output_config", "max_train_epochs"}


def test_output_config_adds_toml_suffix(tiny_sd_dir, workdir, capsys):
    target = workdir / "run"
    code = train_leco.main(base_args(tiny_sd_dir, workdir) + ["--network_dim", "12", "--output_config",
                                                              "--config_file", str(target)])
    assert code == 0, capsys.readouterr()
    assert (workdir / "run.toml").is_file() and not target.exists()
    args, _ = parse_namespace(["--config_file", str(target)], "sd")  # found without the suffix too
    assert args.network_dim == 12


def test_write_config_file_skips_none_and_false(tmp_path):
    path = write_config_file(str(tmp_path / "c.toml"), {"seed": None, "v2": False, "sdpa": True, "network_dim": 4,
                                                       "output_name": "x"})
    assert path.read_text(encoding="utf-8").splitlines() == ['network_dim = 4', 'output_name = "x"', "sdpa = true"]


def test_output_config_round_trips_control_characters(tmp_path):
    path = write_config_file(str(tmp_path / "c.toml"), {"training_comment": "a\x7fb\x1bc\x00d"})
    assert read_config_file(str(path), setup_parser("sd"))["training_comment"] == "a\x7fb\x1bc\x00d"


def test_output_config_needs_config_file(tiny_sd_dir, workdir, capsys):
    before = set(workdir.rglob("*"))
    code = train_leco.main(base_args(tiny_sd_dir, workdir) + ["--output_config"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "--config_file" in captured.err
    assert set(workdir.rglob("*")) == before


@pytest.mark.parametrize("family, extra, fragment", [
    ("sd", ["--max_denoising_steps", "1"], "--max_denoising_steps"),
    ("sd", ["--max_train_epochs", "10"], "--max_train_steps"),
    ("sd", ["--full_bf16"], "--full_bf16"),
    ("sdxl", ["--clip_skip", "2"], "--clip_skip"),
    ("sdxl", ["--v2"], "--v2"),
])
def test_output_config_checks_flags_first(family, extra, fragment, model_dirs, workdir, capsys):
    out = workdir / "run.toml"
    code = SCRIPTS[family].main(base_args(model_dirs[family], workdir) + extra + ["--output_config",
                                                                                 "--config_file", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# --optimizer_args / --network_args


def test_parse_key_values():
    assert parse_key_values(["weight_decay=0.01", "betas=0.9,0.999"], "--optimizer_args") == {
        "weight_decay": "0.01", "betas": "0.9,0.999"}
    assert parse_key_values([" conv_dim = 4 ", "train_method=xattn"], "--network_args") == {
        "conv_dim": "4", "train_method": "xattn"}
    assert parse_key_values(None, "--network_args") == {}
    assert parse_key_values(["expr=a=b"], "--network_args") == {"expr": "a=b"}  # split at the first '='


@pytest.mark.parametrize("item", ["weight_decay", "=0.1", " =1"])
def test_parse_key_values_rejects_items_without_key(item):
    with pytest.raises(UserError) as info:
        parse_key_values(["betas=0.9,0.99", item], "--optimizer_args")
    assert str(info.value).startswith("--optimizer_args: ")
    assert item in str(info.value)


def test_literal_values():
    values = literal_values({
        "betas": "0.9,0.999", "decouple": "True", "weight_decay": "0.01", "eps": "1e-8", "steps": "3",
        "d_coef": "-1.5", "name": "cosine", "phrase": "two words", "quoted": "'text'", "empty": "",
    })
    assert values["betas"] == (0.9, 0.999)
    assert values["decouple"] is True
    assert values["weight_decay"] == 0.01
    assert values["eps"] == 1e-08
    assert values["steps"] == 3 and isinstance(values["steps"], int)
    assert values["d_coef"] == -1.5
    assert values["name"] == "cosine"
    assert values["phrase"] == "two words"
    assert values["quoted"] == "text"
    assert values["empty"] == ""


# ----------------------------------------------------------------------------------------------
# Sample prompt file


def test_sample_prompt_options_in_any_order():
    assert parse_sample_line("  a dog --w 640 --n cat --s 5  ", "s.txt:1") == SamplePrompt(
        prompt="a dog", negative="cat", steps=5, width=640)


def test_sample_prompt_all_options():
    prompt = parse_sample_line("a red circle, blue sky --n blurry, low quality --s 20 --l 6.5 --d 42 --w 512 --h 768",
                               "s.txt:1")
    assert prompt == SamplePrompt(prompt="a red circle, blue sky", negative="blurry, low quality", steps=20,
                                  guidance_scale=6.5, seed=42, width=512, height=768)


def test_sample_prompt_defaults():
    assert parse_sample_line("just a prompt", "s.txt:1") == SamplePrompt(prompt="just a prompt")
    assert SamplePrompt("x").steps == 20 and SamplePrompt("x").guidance_scale == 7.5


def test_sample_prompt_upper_case_options():
    prompt = parse_sample_line("a cat --W 512 --H 256 --N dog --S 8 --L 4 --D 7", "s.txt:1")
    assert prompt == SamplePrompt(prompt="a cat", negative="dog", steps=8, guidance_scale=4.0, seed=7,
                                  width=512, height=256)


def test_sample_prompt_empty_negative_before_option():
    assert parse_sample_line("a cat --n --s 30", "s.txt:1") == SamplePrompt(prompt="a cat", negative="", steps=30)
    assert parse_sample_line("a cat --n", "s.txt:1") == SamplePrompt(prompt="a cat", negative="")


def test_sample_prompt_double_dash_inside_words_is_text():
    assert parse_sample_line("a--b c--d --n e--f", "s.txt:1") == SamplePrompt(prompt="a--b c--d", negative="e--f")


def test_load_sample_prompts_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "samples.txt"
    path.write_text("# comment\n\n   \na cat --s 4\n  # indented comment\n\ta dog --n cat\n", encoding="utf-8")
    assert load_sample_prompts(path) == (SamplePrompt(prompt="a cat", steps=4),
                                         SamplePrompt(prompt="a dog", negative="cat"))


SAMPLE_ERRORS = {
    "unknown_option": ("a cat --q 3", ["unknown option", "--q"]),
    "unknown_long_option": ("a cat --negative dog", ["unknown option", "--negative"]),
    "width_not_multiple_of_8": ("a cat --w 500", ["--w", "multiple of 8", "500"]),
    "height_zero": ("a cat --h 0", ["--h", "0"]),
    "height_negative": ("a cat --h -64", ["--h", "-64"]),
    "width_text": ("a cat --w wide", ["--w", "wide"]),
    "steps_zero": ("a cat --s 0", ["--s", ">= 1"]),
    "steps_negative": ("a cat --s -3", ["--s", ">= 1"]),
    "steps_text": ("a cat --s many", ["--s", "number", "many"]),
    "steps_fraction": ("a cat --s 2.5", ["--s", "2.5"]),
    "steps_missing": ("a cat --s", ["--s", "number"]),
    "guidance_text": ("a cat --l high", ["--l", "number", "high"]),
    "seed_text": ("a cat --d lucky", ["--d", "number", "lucky"]),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_ERRORS))
def test_sample_prompt_errors(name, tmp_path):
    line, fragments = SAMPLE_ERRORS[name]
    path = tmp_path / "samples.txt"
    path.write_text(f"# header\nok prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_sample_prompts(path)
    message = str(info.value)
    assert message.startswith("samples.txt:3: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("text, fragment", [
    (None, "file not found"),
    ("# only\n\n   \n", "no prompts"),
    ("", "no prompts"),
])
def test_sample_prompt_file_errors(tmp_path, text, fragment):
    path = tmp_path / "samples.txt"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_sample_prompts(path)
    assert str(info.value).startswith("--sample_prompts: ")
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------------------------
# Checks added after review: validation before any model is loaded, precision from accelerate


@pytest.mark.parametrize("network_args, fragment", [
    (["conv_dim=4", "train_method=xattn"], "conv_dim"),
    (["include=("], "include"),
    (["rank_dropout=2"], "rank_dropout"),
    (["block_dims=1,2"], "block_dims"),
])
def test_network_args_are_checked_before_loading(network_args, fragment, tiny_sd_dir, workdir, capsys, no_training):
    assert train_leco.main(base_args(tiny_sd_dir, workdir) + ["--network_args", *network_args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --network_args") and fragment in err[0]


def test_output_config_refuses_to_overwrite(tiny_sd_dir, workdir, capsys):
    existing = workdir / "existing.toml"
    existing.write_text("network_dim = 8\n", encoding="utf-8")
    assert train_leco.main(base_args(tiny_sd_dir, workdir) + ["--output_config", "--config_file", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err
    assert existing.read_text(encoding="utf-8") == "network_dim = 8\n"


def test_mixed_precision_defaults_to_accelerate_launch_setting(tiny_sd_dir, workdir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args, _ = parse_namespace(base_args(tiny_sd_dir, workdir) + ["--full_bf16"], "sd")
    assert build_run_config(args, "sd").train.mixed_precision == "bf16"
    args, _ = parse_namespace(base_args(tiny_sd_dir, workdir) + ["--mixed_precision", "no"], "sd")
    assert build_run_config(args, "sd").train.mixed_precision == "no"  # the flag wins
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    args, _ = parse_namespace(base_args(tiny_sd_dir, workdir), "sd")
    assert build_run_config(args, "sd").train.mixed_precision == "no"


def test_model_config_dir_must_be_a_config_folder(tiny_sd_dir, workdir, capsys, no_training):
    checkpoint = workdir / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    argv = drop(base_args(tiny_sd_dir, workdir), "--pretrained_model_name_or_path") + [
        "--pretrained_model_name_or_path", str(checkpoint), "--model_config_dir", str(workdir)]
    assert train_leco.main(argv) == 2
    assert "model_index.json" in capsys.readouterr().err
