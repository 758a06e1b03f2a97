import pytest

from tactic.config import DEFAULT_PARAMS, ParamsError, load_params, parse_params


def test_repo_params_are_valid():
    p = load_params(DEFAULT_PARAMS)
    assert len(p.seeds) >= 3
    assert p.jpeg.qualities == [2, 5, 10, 15, 25, 50]


@pytest.mark.parametrize("raw, needle", [
    ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
    ({"train": {"lrr": 0.1}}, "train.lrr: unknown key"),
    ({"model": {"task": {"arch": "vgg"}}}, "model.task.arch: Input should be 'small-cnn', 'resnet18', 'resnet50', 'inception_v3', 'small-fcn' or 'fcn_resnet101'"),
    ({"jpeg": {"qualities": [0, 50]}}, "jpeg.qualities"),
    ({"seeds": []}, "seeds: must be a non-empty list"),
    ({"betas": [0.1, 2]}, "betas: write every beta as a decimal"),
    ({"device": "tpu"}, "device: Input should be 'auto', 'cpu' or 'cuda'"),
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
