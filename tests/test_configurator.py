import pytest

from configurator import ConfigError, parse_config

DEFAULTS = {
    "out_dir": "out", "batch_size": 64, "learning_rate": 5e-4, "compile": False, "min_lr": None,
    "wandb_run_name": None, "dropout": 0.0, "max_iters": 1000,
}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_no_arguments_gives_a_copy_of_the_defaults():
    config = parse_config(DEFAULTS, [])
    assert config == DEFAULTS and config is not DEFAULTS


def test_config_file_then_command_line_wins(tmp_path):
    path = write(tmp_path, "c.py", "batch_size = 32\nlearning_rate = 1e-3\n")
    # the --key=value wins over the file wherever it appears on the line
    config = parse_config(DEFAULTS, ["--batch_size=16", path])
    assert config["batch_size"] == 16 and config["learning_rate"] == 1e-3


def test_later_files_override_earlier_ones(tmp_path):
    a = write(tmp_path, "a.py", "batch_size = 32\n")
    b = write(tmp_path, "b.py", "batch_size = 8\n")
    assert parse_config(DEFAULTS, [a, b])["batch_size"] == 8


def test_config_file_runs_in_its_own_namespace(tmp_path):
    path = write(tmp_path, "c.py", "import math\n_scale = 4\ndef helper(x):\n    return x\n"
                                   "batch_size = helper(_scale * 8)\nlearning_rate = math.sqrt(1e-6)\n")
    config = parse_config(DEFAULTS, [path])
    assert config["batch_size"] == 32 and config["learning_rate"] == pytest.approx(1e-3)
    assert "math" not in config and "_scale" not in config and "helper" not in config


def test_literals_from_the_command_line():
    config = parse_config(DEFAULTS, ["--learning_rate=3e-4", "--compile=True", "--min_lr=1e-5",
                                     "--out_dir=out/run-1", "--wandb_run_name='quoted'", "--dropout=0.1"])
    assert config["learning_rate"] == 3e-4 and config["compile"] is True and config["min_lr"] == 1e-5
    assert config["out_dir"] == "out/run-1" and config["wandb_run_name"] == "quoted"
    assert config["dropout"] == 0.1


def test_int_for_float_and_whole_float_for_int():
    config = parse_config(DEFAULTS, ["--learning_rate=1", "--max_iters=2e5"])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)
    assert config["max_iters"] == 200000 and isinstance(config["max_iters"], int)


def test_none_defaults_take_any_value_and_values_may_contain_equals():
    config = parse_config(DEFAULTS, ["--wandb_run_name=lr=3e-4,bs=64", "--min_lr=0"])
    assert config["wandb_run_name"] == "lr=3e-4,bs=64" and config["min_lr"] == 0
    assert parse_config(DEFAULTS, ["--out_dir=a=b"])["out_dir"] == "a=b"


def test_string_keys_keep_numbers_as_text():
    assert parse_config(DEFAULTS, ["--out_dir=2024"])["out_dir"] == "2024"


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("1", True), ("0", False),
                                            ("yes", True), ("off", False)])
def test_booleans(text, expected):
    assert parse_config(DEFAULTS, [f"--compile={text}"])["compile"] is expected


def test_bare_flag_switches_a_boolean_on():
    assert parse_config(DEFAULTS, ["--compile"])["compile"] is True
    with pytest.raises(ConfigError, match="needs a value"):
        parse_config(DEFAULTS, ["--batch_size"])


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'") as e:
        parse_config(DEFAULTS, ["--learnig_rate=1e-3"])
    assert "\n" not in str(e.value)
    path = write(tmp_path, "c.py", "batchsize = 32\n")
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'batchsize' \(in .*c\.py\); did you mean 'batch_size'"):
        parse_config(DEFAULTS, [path])


def test_unknown_key_with_nothing_close_lists_the_keys():
    with pytest.raises(ConfigError, match="valid keys: batch_size, compile"):
        parse_config(DEFAULTS, ["--zzzzzz=1"])


@pytest.mark.parametrize("arg", ["--batch_size=abc", "--batch_size=32.5", "--compile=maybe",
                                 "--learning_rate='x'", "--batch_size=None", "--learning_rate=True",
                                 "--batch_size=[1]"])
def test_wrong_types_are_one_line_errors(arg):
    key = arg[2:].split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}") as e:
        parse_config(DEFAULTS, [arg])
    assert "\n" not in str(e.value)


def test_wrong_type_in_a_file(tmp_path):
    path = write(tmp_path, "c.py", "compile = 'yes'\n")
    with pytest.raises(ConfigError, match="compile='yes' .*wrong type: expected bool"):
        parse_config(DEFAULTS, [path])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(DEFAULTS, [str(tmp_path / "missing.py")])
    with pytest.raises(ConfigError, match=r"c\.py:2: syntax error"):
        parse_config(DEFAULTS, [write(tmp_path, "c.py", "batch_size = 1\nbatch_size = = 2\n")])
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        parse_config(DEFAULTS, [write(tmp_path, "d.py", "batch_size = 1 // 0\n")])


def test_single_dash_and_bare_double_dash_are_errors():
    for arg in ("-batch_size=3", "--"):
        with pytest.raises(ConfigError, match="--key=value"):
            parse_config(DEFAULTS, [arg])



TYPES = {"min_lr": float | None, "wandb_run_name": str | None}


@pytest.mark.parametrize("arg, message", [
    ("--min_lr=abc", "min_lr='abc' (from --min_lr=abc) has the wrong type: expected float or None, got str"),
    ("--min_lr=True", "expected float or None, got bool"),
])
def test_none_defaults_are_checked_against_their_annotation(arg, message):
    with pytest.raises(ConfigError) as e:
        parse_config(DEFAULTS, [arg], types=TYPES)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_annotated_none_defaults_still_take_their_types_and_none():
    config = parse_config(DEFAULTS, ["--min_lr=0", "--wandb_run_name=2024"], types=TYPES)
    assert config["min_lr"] == 0.0 and isinstance(config["min_lr"], float)
    assert config["wandb_run_name"] == "2024"  # text, as the annotation says
    assert parse_config(DEFAULTS, ["--min_lr=None"], types=TYPES)["min_lr"] is None
    assert parse_config({"n": None}, ["--n=2e3"], types={"n": int | None})["n"] == 2000
    with pytest.raises(ConfigError, match="expected int or None, got float"):
        parse_config({"n": None}, ["--n=1.5"], types={"n": int | None})


def test_the_result_records_where_each_key_came_from(tmp_path):
    # batch_size = 64: the default's value, but set on purpose
    path = write(tmp_path, "c.py", "batch_size = 64\nlearning_rate = 1e-3\n")
    config = parse_config(DEFAULTS, [path, "--compile=False", "--min_lr=1e-5", "--learning_rate=2e-3"])
    assert config.given == {"batch_size", "compile", "min_lr", "learning_rate"}
    assert config.source == {
        **dict.fromkeys(DEFAULTS, "default"), "batch_size": path, "compile": "command line",
        "min_lr": "command line", "learning_rate": "command line"}
    assert parse_config(DEFAULTS, []).given == set()


def test_other_projects_names(tmp_path):
    # renamed: the "did you mean" points at ours; ignored: accepted from a file or the command line, noted
    renamed, ignored = {"n_embd": "dim"}, {"always_save": "every eval saves anyway"}
    with pytest.raises(ConfigError, match="unknown config key 'n_embd' .*; did you mean 'dim'"):
        parse_config({"dim": 64, "n_heads": 4}, ["--n_embd=32"], renamed=renamed)
    path = write(tmp_path, "c.py", "always_save = True\nbatch_size = 8\n")
    config = parse_config(DEFAULTS, [path, "--always_save=False"], ignored=ignored)
    assert config == DEFAULTS | {"batch_size": 8} and config.given == {"batch_size"}
    assert config.notes == [f"note: always_save (in {path}) is not needed here: every eval saves anyway",
                            "note: always_save (from --always_save=False) is not needed here: every eval "
                            "saves anyway"]
