import shutil

import mlflow
import numpy as np
import pytest
import torch

from tactic import tracking
from tactic.experiment.run import evaluate_run, pretrain_codec, train_task
from tactic.experiment.grid import Run


@pytest.fixture(scope="module")
def codec_models(tmp_path_factory, tiny_params, prepared):
    models = tmp_path_factory.mktemp("codec") / "models"
    for beta in tiny_params.betas:
        pretrain_codec(tiny_params, Run("pretrain", 0, beta=beta), prepared, models)
    return models


def _models_with_codec(codec_models, dest):
    shutil.copytree(codec_models, dest)
    return dest


def test_interrupted_training_resumes_to_the_same_model(tiny_params, prepared, codec_models, tmp_path, monkeypatch):
    # With a cosine schedule the learning rates depend on the step: a resumed run must continue it.
    tiny_params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"lr_schedule": "cosine"})})
    run = Run("aware", 0, beta=0.03)
    ref_models = _models_with_codec(codec_models, tmp_path / "ref" / "models")
    train_task(tiny_params, run, prepared, ref_models)
    reference = torch.load(ref_models / run.key / "model.pt", weights_only=False)

    models = _models_with_codec(codec_models, tmp_path / "cut" / "models")
    real_log = tracking.log_metrics

    def log_then_die(metrics, step=None):
        real_log(metrics, step)
        if step == 1:  # after the second epoch trained, before its checkpoint is written
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_task(tiny_params, run, prepared, models)
    monkeypatch.setattr(tracking, "log_metrics", real_log)
    assert not (models / run.key / "model.pt").exists()
    ckpt = models.parent / ".checkpoints" / run.key / "last.pt"
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 0

    train_task(tiny_params, run, prepared, models)
    resumed = torch.load(models / run.key / "model.pt", weights_only=False)
    assert not ckpt.exists()
    assert resumed["mlflow_run_id"] == state["mlflow_run_id"]  # the same MLflow run, continued
    for k, v in reference["task"].items():
        assert torch.equal(v, resumed["task"][k]), k
    for k, v in reference["codec"]["state"].items():
        assert torch.equal(v, resumed["codec"]["state"][k]), k
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]


def test_stale_checkpoint_is_not_resumed(tiny_params, prepared, tmp_path, capsys):
    run = Run("uncompressed", 0)
    models = tmp_path / "models"
    ckpt = models.parent / ".checkpoints" / run.key / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"config_id": "another", "epoch": 0}, ckpt)
    train_task(tiny_params, run, prepared, models)
    assert "written by another configuration" in capsys.readouterr().err
    assert (models / run.key / "model.pt").exists()


def test_a_checkpoint_from_a_codec_since_retrained_is_not_resumed(tiny_params, prepared, codec_models, tmp_path,
                                                                    monkeypatch, capsys):
    """`aware` interrupted, then its pre-trained codec made again (a changed `pretrain` param: DVC re-runs
    both stages): the run starts over from the new codec instead of resuming weights fine-tuned from the old."""
    run = Run("aware", 0, beta=0.03)
    models = _models_with_codec(codec_models, tmp_path / "models")
    real_log = tracking.log_metrics

    def log_then_die(metrics, step=None):
        real_log(metrics, step)
        if step == 1:  # the first epoch's checkpoint written
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_task(tiny_params, run, prepared, models)
    monkeypatch.setattr(tracking, "log_metrics", real_log)
    assert (models.parent / ".checkpoints" / run.key / "last.pt").is_file()
    codec_file = run.codec_run.model_path(models)
    codec = torch.load(codec_file, weights_only=False)
    codec["codec"]["state"]["g_s.0.bias"] += 0.01
    torch.save(codec, codec_file)
    capsys.readouterr()
    train_task(tiny_params, run, prepared, models)
    assert "written by another configuration" in capsys.readouterr().err
    assert [h["epoch"] for h in torch.load(models / run.key / "model.pt", weights_only=False)["history"]] == [0, 1]


@pytest.mark.parametrize("mode, point", [("uncompressed", {}), ("jpeg", {"quality": 5}), ("agnostic", {"beta": 0.3})])
def test_modes_train_evaluate_and_log(tiny_params, prepared, codec_models, tmp_path, mode, point):
    run = Run(mode, 0, **point)
    models = _models_with_codec(codec_models, tmp_path / "models")
    train_task(tiny_params, run, prepared, models)
    row = evaluate_run(tiny_params, run, prepared, models, "cpu")
    assert 0.0 <= row["accuracy"] <= 1.0 and row["num_images"] == 100
    if mode == "uncompressed":
        assert row["bpp"] == 8.0 and row["psnr"] is None
    elif mode == "jpeg":
        assert 0 < row["bpp"] < row["bpp_file"]
        assert 10 < row["psnr"] < 40
    else:
        assert 0 < row["bpp"] and abs(row["bpp"] - row["bpp_estimated"]) < 0.3
    logged = mlflow.get_run(row["mlflow_run_id"])
    assert logged.data.params["mode"] == mode
    assert logged.data.tags["dvc_stage"] == run.stage
    assert "val_task_loss" in logged.data.metrics


def test_agnostic_keeps_the_codec_frozen(tiny_params, prepared, codec_models, tmp_path):
    run = Run("agnostic", 0, beta=0.03)
    models = _models_with_codec(codec_models, tmp_path / "models")
    train_task(tiny_params, run, prepared, models)
    before = torch.load(models / run.codec_run.key / "model.pt", weights_only=False)["codec"]["state"]
    after = torch.load(models / run.key / "model.pt", weights_only=False)["codec"]["state"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode, point", [("jpeg", {"quality": 5}), ("agnostic", {"beta": 0.3})])
def test_a_fixed_front_end_trains_its_task_network_on_its_test_time_round_trip(tiny_params, prepared, codec_models, tmp_path,
                                                                                monkeypatch, mode, point):
    """JPEG and the frozen codec are deterministic: their task networks train and validate on what
    `code` gives of each image (JPEG files, real bitstreams decoded), made once, not every epoch."""
    from tactic.data import to_float
    from tactic.data.prepared import load_split, read_meta
    from tactic.experiment.modes import MODES

    run = Run(mode, 0, **point)
    models = _models_with_codec(codec_models, tmp_path / "models")
    plan = MODES[mode].plan(tiny_params, run, read_meta(prepared), prepared, models, torch.device("cpu"))
    assert plan.system.codec is None and plan.system.task is plan.save.task  # what is trained is what is saved
    cached = plan.splits()
    for split, name in zip(cached, ("train", "val")):
        images = load_split(prepared, name).images
        assert len(split) == len(images)
        x = to_float(images[-7:], "cpu")  # the end of the last batch
        coded = MODES[mode].code(plan.save, x, run.quality, ["image"] * len(x), measure=False).task_input
        if mode == "jpeg":  # 8-bit images, cached as they are
            assert split.images.dtype.name == "uint8" and torch.equal(to_float(split.images[-7:], "cpu"), coded)
        else:  # the same decoder on the same rounded latents, in a batch of another size
            torch.testing.assert_close(to_float(split.images[-7:], "cpu"), coded, rtol=0, atol=1e-5)
        assert not torch.equal(coded, x)
    # Codes too large to cache (here any size) are made again whenever a batch is read: the same rows.
    for f in plan.caches:
        f.unlink()
    monkeypatch.setenv("TACTIC_CODE_CACHE_GIB", "0")
    made = plan.splits()
    assert not any(f.exists() for f in plan.caches)
    for split, kept in zip(made, cached):
        assert len(split) == len(kept)
        rows = np.arange(len(split) - 7, len(split))
        torch.testing.assert_close(to_float(split.images[rows], "cpu"), to_float(kept.images[-7:], "cpu"), rtol=0,
                                   atol=0 if mode == "jpeg" else 1e-5)
    monkeypatch.delenv("TACTIC_CODE_CACHE_GIB")
    train_task(tiny_params, run, prepared, models)
    assert not list((models.parent / ".checkpoints").rglob("codes-*.npy")) and not list(models.rglob("codes-*.npy"))


def test_divergence_stops_at_the_step_names_the_part_and_fails_the_run(tiny_params, prepared, codec_models, tmp_path):
    from tactic.config import merged, parse_params
    from tactic.experiment.train import DivergenceError

    p = parse_params(merged(tiny_params.model_dump(), {"train": {"lr": 1e12, "codec_lr": 1e12}}))
    run = Run("aware", 0, beta=0.03)
    models = _models_with_codec(codec_models, tmp_path / "models")
    with pytest.raises(DivergenceError, match=r"train_aware@0.03-0: training diverged at epoch 1, step \d+: .*(mse|task|bpp) loss = (nan|inf)"):
        train_task(p, run, prepared, models)
    assert not (models / run.key / "model.pt").exists()
    assert not (models.parent / ".checkpoints" / run.key / "last.pt").exists()  # nothing non-finite kept
    runs = mlflow.search_runs(experiment_names=["tactic"], filter_string="tags.dvc_stage = 'train_aware@0.03-0'")
    diverged = runs[runs["tags.failure_reason"].fillna("").str.contains("training diverged")]
    assert len(diverged) == 1 and diverged.iloc[0]["status"] == "FAILED"


def test_nhwc_training_changes_the_layout_not_the_values():
    """`fit` trains narrow networks in NHWC (faster there): the same weights give the same loss and
    gradients as in NCHW, up to float rounding; wide ones (the ResNets) stay NCHW, where NHWC is slower."""
    from tactic.codecs.codec import TacticCodec
    from tactic.experiment.system import System
    from tactic.experiment.train import channels_last, use_nhwc
    from tactic.losses import TacticLoss
    from tactic.tasks.classifiers import build_classifier

    torch.manual_seed(0)
    system = System(TacticCodec(1, 16, 8), build_classifier("small-cnn", 1, 10, 16)).train()
    loss_fn = TacticLoss(0.1, 0.1, 0.4)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    results = []
    for nhwc in (False, True):
        if nhwc:
            system.to(memory_format=torch.channels_last)
        torch.manual_seed(1)  # the rate term's uniform noise
        inp = channels_last(x) if nhwc else x
        system.zero_grad()
        loss = loss_fn(system(inp), inp, y)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in system.parameters() if p.grad is not None]))
    assert system.codec.g_a[0].weight.is_contiguous(memory_format=torch.channels_last)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5) and len(grads_a) == len(grads_b)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(grads_a, grads_b))
    assert use_nhwc(system) and not use_nhwc(build_classifier("resnet50", 1, 10))


def test_pooling_by_matrices_is_torch_s_adaptive_pooling_and_replaces_it_everywhere():
    """On CUDA with deterministic algorithms on, adaptive average pooling runs as two averaging
    matrices (torch's CUDA backward adds with atomics): the same values and gradients as torch's."""
    from torchvision.models import resnet18

    from tactic.tasks.classifiers import build_classifier
    from tactic.tasks.pooling import AdaptiveAvgPool2d, deterministic_pooling, pool_by_matrices

    for shape, size in (((2, 3, 7, 7), 4), ((2, 3, 7, 7), 1), ((1, 2, 9, 5), (3, None)), ((1, 1, 6, 6), (6, 2))):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        g = torch.randn_like(torch.nn.functional.adaptive_avg_pool2d(x, size))
        want = torch.nn.functional.adaptive_avg_pool2d(x, size)
        (want_grad,) = torch.autograd.grad(want, x, g)
        got = pool_by_matrices(x, size)
        (got_grad,) = torch.autograd.grad(got, x, g)
        assert torch.allclose(got, want) and torch.allclose(got_grad, want_grad), (shape, size)
    for net in (build_classifier("small-cnn", 1, 10, 8), resnet18(num_classes=10)):
        keys = net.state_dict().keys()
        pools = [m for m in deterministic_pooling(net).modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
        assert pools and all(type(m) is AdaptiveAvgPool2d for m in pools) and net.state_dict().keys() == keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_seed_trains_the_same_weights_on_cuda():
    from tactic.codecs.codec import TacticCodec
    from tactic.config import parse_params
    from tactic.experiment.system import System, resolve_device
    from tactic.losses import TacticLoss
    from tactic.tasks.classifiers import build_classifier

    device = resolve_device(parse_params({"device": "cuda"}))
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        system = System(TacticCodec(1, 16, 8), build_classifier("small-cnn", 1, 10, 16)).to(device).train()
        opt, loss_fn = torch.optim.Adam(system.parameters(), 1e-3), TacticLoss(0.1, 0.1, 0.4)
        for _ in range(5):
            x, y = torch.rand(32, 1, 28, 28, device=device), torch.randint(0, 10, (32,), device=device)
            opt.zero_grad()
            loss_fn(system(x), x, y)["loss"].backward()
            opt.step()
        weights.append([p.detach().cpu() for p in system.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
