"""options.py: the option table, --help, typed values with ranges and choices, config files, and the
checks that span options; every bad value or file is one sentence naming it. A property test
(hypothesis) drives the parser with arbitrary command lines and config files."""
import os
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import options
from conftest import ROOT


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_options(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name, (default, meaning) in options.OPTIONS.items():
        assert f"--{name:<28} {meaning} [default: {default!r}]" in text, name


def test_the_options_page_documents_every_option():
    page = open(os.path.join(ROOT, "docs", "options.md")).read()
    for name, (default, meaning) in options.OPTIONS.items():
        assert f"| `{name}` | `{default!r}` | {meaning} |" in page, name


def test_options_are_typed_and_named_in_errors(tmp_path):
    cfg, explicit = options.parse_options(["--max_steps=5", "--compile", "--packing=false", "--learning_rate=1"])
    assert cfg["max_steps"] == 5 and cfg["compile"] is True and cfg["packing"] is False
    assert cfg["learning_rate"] == 1.0 and explicit == {"max_steps", "compile", "packing", "learning_rate"}
    bad = {"--max_step=5": "unknown option --max_step", "--max_steps=five": "--max_steps must be int",
           "--compile=maybe": "--compile must be true or false", "--dtype=fp8": "--dtype must be one of",
           "--batch_size": "--batch_size needs a value", "--batch_size=0": "--batch_size must be at least 1",
           "--learning_rate=-1e-3": "--learning_rate must be at least 0", "--max_seq_len=1": "between 2 and 1048576",
           "--dropout=2": "--dropout must be between 0 and 0.99"}
    for arg, message in bad.items():
        with pytest.raises(options.OptionError, match=message):
            options.parse_options([arg])


@pytest.mark.parametrize("name, text, message", [
    ("broken", "n_layer = (\n", "broken.py failed to run: SyntaxError"),
    ("unknown", "n_layers = 3\n", "unknown.py sets unknown option 'n_layers'"),
    ("typed", "n_layer = 'three'\n", "typed.py: --n_layer must be int"),
])
def test_config_file_errors_name_the_file(tmp_path, name, text, message):
    (tmp_path / f"{name}.py").write_text(text)
    with pytest.raises(options.OptionError, match=message):
        options.parse_options([str(tmp_path / f"{name}.py")])


def test_config_file_then_command_line(tmp_path):
    with pytest.raises(options.OptionError, match="nope.py does not exist"):
        options.parse_options([str(tmp_path / "nope.py")])
    good = tmp_path / "good.py"
    good.write_text("import math\nn_layer = 3\nlearning_rate = math.sqrt(4e-8)\n")
    cfg, explicit = options.parse_options([str(good), "--n_layer=5"])
    assert cfg["n_layer"] == 5 and cfg["learning_rate"] == pytest.approx(2e-4) and "learning_rate" in explicit


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e400"])
def test_non_finite_numbers_are_refused_on_the_command_line(value):
    with pytest.raises(options.OptionError, match="--learning_rate must be a finite number, got "):
        options.parse_options([f"--learning_rate={value}"])


@pytest.mark.parametrize("text", ["float('nan')", "float('inf')", "10 ** 400", "-1e999"])
def test_non_finite_numbers_are_refused_in_config_files(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(f"grad_clip = {text}\n")
    with pytest.raises(options.OptionError, match=f"{path}: --grad_clip must be a finite number"):
        options.parse_options([str(path)])


def test_only_py_files_are_taken_as_config_files(tmp_path, data_file):
    """Anything else given without -- would run as python: a data file set nothing and training went on."""
    with pytest.raises(options.OptionError, match=f"is not a config file .* give data as --data_path={data_file}"):
        options.parse_options([data_file])
    script = tmp_path / "settings.txt"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    with pytest.raises(options.OptionError, match="settings.txt is neither a config file .* nor an option"):
        options.parse_options([str(script)])
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- property-based: options and config files

def option_value_texts(name):
    """Command-line values for one option: mostly of its type (NaN and Inf included), sometimes not."""
    default = options.OPTIONS[name][0]
    if isinstance(default, bool):
        typed = st.sampled_from(["true", "false", "1", "0", "yes", "no", "maybe", ""])
    elif isinstance(default, int):
        typed = st.integers(min_value=-3, max_value=10**6).map(str) | st.sampled_from(["1e400", "nan", "2.5", "0"])
    elif isinstance(default, float):
        typed = st.one_of(st.floats().map(repr), st.integers(min_value=-3, max_value=10**6).map(str),
                          st.sampled_from(["nan", "inf", "-inf", "1e400", "0.5"]))
    else:
        typed = st.sampled_from(options.CHOICES.get(name, [default]))
    return st.one_of(typed, typed, typed, st.text(max_size=6))


def python_literals(name):
    """Config-file values for one option: mostly of its type (NaN, Inf and huge ints included), sometimes not."""
    default = options.OPTIONS[name][0] if name in options.OPTIONS else ""
    if isinstance(default, bool):
        typed = st.booleans().map(repr)
    elif isinstance(default, (int, float)):
        typed = (st.integers(min_value=-10**400, max_value=10**400) | st.floats()).map(
            lambda x: f"float({str(x)!r})" if isinstance(x, float) else repr(x))
    else:
        typed = st.sampled_from(options.CHOICES.get(name, [default])).map(repr)
    other = st.one_of(st.none(), st.text(max_size=6), st.lists(st.integers(), max_size=2)).map(repr)
    return st.one_of(typed, typed, typed, other)


known_names = st.sampled_from(sorted(options.OPTIONS))
any_names = known_names | st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
typed_args = known_names.flatmap(lambda name: option_value_texts(name).map(lambda value: f"--{name}={value}"))
command_line_args = st.one_of(
    typed_args, typed_args, typed_args, typed_args,
    any_names.map(lambda name: f"--{name}"),
    st.text(max_size=10).filter(lambda arg: not arg.startswith("-")))
config_files = st.lists(any_names.flatmap(lambda name: python_literals(name).map(lambda value: (name, value))),
                        max_size=4)


def check_options(cfg, explicit):
    """Parsed options have their default's type, a finite value, and lie in their range and choices."""
    assert explicit <= set(options.OPTIONS)
    for name, (default, _) in options.OPTIONS.items():
        value = cfg[name]
        assert type(value) is type(default), name
        if isinstance(value, float):
            assert value == value and abs(value) != float("inf"), name
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = options.RANGES.get(name, (0, None))
            assert low <= value and (high is None or value <= high), name
        assert name not in options.CHOICES or value in options.CHOICES[name]


@settings(max_examples=200, deadline=5000)
@given(args=st.lists(command_line_args, max_size=3), files=st.lists(config_files, max_size=2))
@example(args=["--learning_rate=nan"], files=[])  # cases the search has found, kept so that they are always tried
@example(args=[], files=[[("grad_clip", "10 ** 400")]])
@example(args=["0\n"], files=[])
@example(args=["a\n.jsonl"], files=[])
@example(args=["--gradient_accumulation_steps=1000000000"], files=[])
@example(args=["--seed=99999999999999999999999"], files=[])
@example(args=["--gradient_accumulation_steps=16384", "--batch_size=100000"], files=[])
def test_any_options_parse_or_name_the_option_or_file(tmp_path_factory, args, files):
    folder = tmp_path_factory.mktemp("opts")
    paths = []
    for k, assignments in enumerate(files):
        paths.append(str(folder / f"cfg{k}.py"))
        with open(paths[-1], "w") as f:
            f.writelines(f"{name} = {literal}\n" for name, literal in assignments)
    argv = [a for a in paths + args if a not in ("-h", "--help")]
    try:
        cfg, explicit = options.parse_options(argv)
    except options.OptionError as error:
        message = str(error)
        assert "\n" not in message.strip() or "failed to run" in message
        assert "--" in message or any(arg in message for arg in argv), message
        return
    check_options(cfg, explicit)
    try:  # and the checks across options either pass or name the options in one line
        options.check_combinations(cfg)
    except options.OptionError as error:
        assert "\n" not in str(error) and "--" in str(error), str(error)


SCRIPTS = [["sample.py"], ["data.py", "inspect"], ["sparse.py", "merge"], ["bench/bench_checkpoint.py"],
           ["bench/bench_parquet_memory.py"], ["bench/bench_train.py"], ["bench/soak_kill.py"],
           ["bench/bench_sparse.py", "cpu"]]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script[0])
def test_every_script_parses_with_options_py(script):
    """One parser for every script: an unknown option is the same one sentence and exit status 2."""
    proc = subprocess.run([sys.executable, *script, "--no_such_option=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    name = os.path.basename(script[0])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"{name}: error: unknown option --no_such_option (--help lists them)"


# ----------------------------------------------------------------------------- absurd values: one sentence each

@pytest.mark.parametrize("arg, message", [
    # accepted, it built a list of 10**9 micro-batches before the first step, growing ~6 MB/s
    ("--gradient_accumulation_steps=1000000000", "--gradient_accumulation_steps must be between 1 and 16384"),
    ("--max_seq_len=1000000000", "--max_seq_len must be between 2 and 1048576"),  # a 128 GB position table
    ("--seed=99999999999999999999999", "--seed must be between 0 and 4294967295"),  # beyond numpy's seeds
    ("--seed=-1", "--seed must be between 0 and 4294967295"),
    ("--initial_scale_power=5000", "--initial_scale_power must be between 0 and 64"),  # 2.0 ** 5000 overflows
])
def test_absurd_numbers_are_refused_with_their_range(arg, message):
    with pytest.raises(options.OptionError) as error:
        options.parse_options([arg])
    assert str(error.value) == f"command line: {message}, got {int(arg.partition('=')[2])}"


def test_a_step_that_cannot_fit_in_memory_is_refused_before_any_work():
    cfg, _ = options.parse_options(["--gradient_accumulation_steps=16384", "--batch_size=4096",
                                    "--max_seq_len=4096"])
    with pytest.raises(options.OptionError) as error:
        options.check_combinations(cfg)
    assert str(error.value) == (
        "--gradient_accumulation_steps=16384 x --batch_size=4096 x --max_seq_len=4096 is 274,877,906,944 token "
        "positions, which one optimizer step holds in memory at once (about 4096 GiB of ids and labels); lower "
        "one of them (at most 268,435,456 positions)")


@pytest.mark.parametrize("json_text, message", [
    ('{"zero_optimization": [1]}', "zero_optimization must be a JSON object, not list"),
    ('{"zero_optimization": {"offload_optimizer": "cpu"}}',
     "zero_optimization.offload_optimizer must be a JSON object, not str"),
    ('{"fp16": {"enabled": "yes"}}', "fp16.enabled must be true or false, not str"),
    ('{"train_batch_size": "8"}', "train_batch_size must be an integer, not str"),
    ('{"zero_optimization": {"stage": 2.5}}', "zero_optimization.stage must be an integer, not float"),
])
def test_deepspeed_json_fields_of_the_wrong_type_are_one_sentence(tmp_path, json_text, message):
    import deepspeed_engine  # DeepSpeed itself is imported only when it trains
    path = tmp_path / "ds.json"
    path.write_text(json_text)
    with pytest.raises(options.OptionError) as error:
        deepspeed_engine.read_deepspeed_json(str(path))
    assert str(error.value) == f"--deepspeed_config={path}: {message}"


def test_a_scratch_model_larger_than_the_machine_is_refused_before_it_is_built():
    import torch
    import train_sft
    cfg, _ = options.parse_options(["--n_layer=100000", "--n_embd=8192"])
    with pytest.raises(options.OptionError) as error:
        train_sft.prepare_model(cfg, 50257, None, torch.device("cpu"))
    assert str(error.value).startswith("--n_layer=100000 --n_embd=8192 --max_seq_len=512 make a model of about "
                                       "80,531,052,699,648 parameters, whose float32 weights alone (300,002 GiB) exceed the ")


def test_a_config_file_that_exits_is_an_error_naming_it(tmp_path):
    """sys.exit(0) in a config file ended the run with exit 0 and no output, which looks like success."""
    path = tmp_path / "leaves.py"
    path.write_text("n_layer = 2\nimport sys\nsys.exit(0)\n")
    with pytest.raises(options.OptionError) as error:
        options.parse_options([str(path)])
    assert str(error.value) == (f"config file {path} called sys.exit(0) or raised SystemExit: a config file "
                                f"only assigns options")


def test_an_eval_file_with_the_demo_is_refused_not_ignored():
    cfg, _ = options.parse_options(["--eval_data_path=missing.jsonl"])
    with pytest.raises(options.OptionError) as error:
        options.check_combinations(cfg)
    assert str(error.value) == ("--eval_data_path=missing.jsonl is not used with --data_path=demo, which brings its "
                                "own eval set: give your training files as --data_path too, or leave it out")


@pytest.mark.parametrize("lora_dim", [33, 10**9])
def test_a_lora_rank_beyond_the_matrices_it_adapts_is_one_sentence(lora_dim):
    """--lora_dim=10**9 was an allocation traceback; a rank above a matrix's smaller side adds nothing."""
    import torch
    import train_sft
    cfg, _ = options.parse_options(["--tokenizer=byte", "--n_layer=1", "--n_head=2", "--n_embd=32",
                                    "--max_seq_len=16", f"--lora_dim={lora_dim}"])
    with pytest.raises(options.OptionError) as error:
        train_sft.prepare_model(cfg, 257, None, torch.device("cpu"))
    assert str(error.value) == (f"--lora_dim={lora_dim} --lora_module_name='h.': a LoRA rank can be at most the "
                                f"smaller side of the matrices it adapts, and transformer.h.0.attn.c_attn is 96x32")
    cfg["lora_dim"] = 32
    assert train_sft.prepare_model(cfg, 257, None, torch.device("cpu")).config.n_embd == 32


def test_the_trainer_refuses_absurd_data_options_with_one_sentence(tmp_path):
    import train_sft
    from conftest import TINY, write_reverse_pairs
    data_file = write_reverse_pairs(tmp_path / "train.jsonl", 20)
    common = TINY + [f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}", "--max_steps=1"]
    with pytest.raises(options.OptionError) as error:
        train_sft.main(common + [f"--data_path={data_file}", "--data_split=inf,1"])
    assert str(error.value) == "data_split must be two finite shares like '98,2', got 'inf,1'"
    with pytest.raises(options.OptionError) as error:
        train_sft.main(common + [f"--data_path={data_file}:1e12"])
    assert str(error.value).startswith(f"the weight of {data_file!r} in data_path is 1e+12, but")
