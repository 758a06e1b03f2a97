import pytest

from tactic.config import DEFAULT_PARAMS, ROOT, ParamsError, load_params, parse_params
from tactic.profiles import PROFILES, resolve_params


def test_repo_params_are_valid():
    p = load_params(DEFAULT_PARAMS)
    assert len(p.seeds) >= 3
    assert p.jpeg.qualities == [2, 5, 10, 15, 25, 50]


@pytest.mark.parametrize("name", sorted(f.stem for f in PROFILES.glob("*.yaml")))
def test_every_shipped_profile_is_valid(name):
    """A typo in a profile would otherwise surface only when someone runs it (some take hours)."""
    p = parse_params(resolve_params(ROOT, profile=name))
    assert p.seeds and p.report.title


@pytest.mark.parametrize("raw, needle", [
    ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
    ({"train": {"lrr": 0.1}}, "train.lrr: unknown key"),
    ({"model": {"task": {"arch": "vgg"}}}, "model.task.arch: Input should be 'small-cnn', 'resnet18', 'resnet50', 'inception_v3', 'small-fcn' or 'fcn_resnet101'"),
    ({"jpeg": {"qualities": [0, 50]}}, "jpeg.qualities"),
    ({"seeds": []}, "seeds: must be a non-empty list"),
    ({"betas": [0.1, 2]}, "betas: write every beta as a decimal"),
    ({"device": "tpu"}, "device: Input should be 'auto', 'cpu' or 'cuda'"),
    ({"latent": {"qualities": [1]}, "prepare": {"size": 96}}, "prepare.size: the hyperprior (latent.qualities) needs a multiple of 64"),
])
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert needle in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_task_must_fit_dataset_and_arch():
    with pytest.raises(ParamsError, match=r"model.task: arch 'small-cnn' is not a segmentation network; one of \['small-fcn'"):
        parse_params({"model": {"task": {"task": "segmentation"}}})
    with pytest.raises(ParamsError, match=r"model.task.task 'segmentation' does not fit prepare.dataset 'fashion-mnist'"):
        parse_params({"model": {"task": {"task": "segmentation", "arch": "small-fcn"}}})
    p = parse_params({"prepare": {"dataset": "fashion-mnist-canvases"}, "model": {"task": {"task": "segmentation", "arch": "small-fcn"}}})
    assert p.train.gamma == 1.0


def test_the_tactic_command_follows_cli_conventions(capsys):
    from tactic import cli

    assert cli.main(["--help"]) == 0 and "tactic datasets check" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.startswith("tactic ")
    assert cli.main(["nonsense"]) == 2 and "usage: tactic" in capsys.readouterr().err
    assert cli.main(["profile", "no-such-profile"]) == 1 and "unknown 'no-such-profile'" in capsys.readouterr().err
