"""Model loading: VGG16 from torchvision and Keras files (weights we generate), downloads, runtimes."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ris.errors import RisError
from ris.images.decode import decode_file
from ris.model import registry as models, runtime, torch_runtime

from .conftest import caltech_files


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def random_vgg16() -> models.VGG16:
    torch.manual_seed(0)
    net = models.VGG16().eval()
    with torch.no_grad():  # He-style scales keep activations alive through 15 layers
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.05, 0.05)
    return net


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.stack([decode_file(str(f), 224).pixels for f in caltech_files("panda", 2)])


def test_torchvision_state_dict_loads_and_gives_fc2(random_vgg16, pixels, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("w") / "vgg16-test.pth"
    torch.save(random_vgg16.state_dict(), path)
    net, digest = models.build("vgg16", weights=str(path))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    mean = torch.tensor(models.IMAGENET_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(models.IMAGENET_STD_RGB).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = random_vgg16.classifier[:5](torch.flatten(random_vgg16.features((x - mean) / std), 1))
        got = net(torch.from_numpy(pixels))
    assert got.shape == (2, 4096) and (got >= 0).all()  # fc2 is taken after its ReLU, as in Keras
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def _write_keras_h5(net: models.VGG16, path: Path) -> None:
    """Save `net` the way Keras' VGG16 weights file lays it out (channels-last kernels, HWC flatten)."""
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    with h5py.File(path, "w") as h5:
        layers = list(models.KERAS_CONV_LAYERS) + ["fc1", "fc2", "predictions"]
        h5.attrs["layer_names"] = [n.encode() for n in layers]
        tensors = [(c.weight.detach().numpy().transpose(2, 3, 1, 0), c.bias.detach().numpy()) for c in convs]
        fc1 = net.classifier[0].weight.detach().numpy().T.reshape(512, 7, 7, -1).transpose(1, 2, 0, 3).reshape(25088, -1)
        tensors.append((fc1, net.classifier[0].bias.detach().numpy()))
        for i in (3, 6):
            tensors.append((net.classifier[i].weight.detach().numpy().T, net.classifier[i].bias.detach().numpy()))
        for name, (kernel, bias) in zip(layers, tensors, strict=True):
            group = h5.create_group(name)
            group.attrs["weight_names"] = [f"{name}_W_1:0".encode(), f"{name}_b_1:0".encode()]
            group.create_dataset(f"{name}_W_1:0", data=kernel)
            group.create_dataset(f"{name}_b_1:0", data=bias)


def _numpy_vgg16_fc2_nhwc(h5path: Path, pixels: np.ndarray) -> np.ndarray:
    """An independent reference: Keras semantics (BGR caffe input, NHWC, HWC flatten) in plain numpy."""
    x = pixels[..., ::-1].astype(np.float32) - np.array(models.CAFFE_MEAN_BGR, dtype=np.float32)
    with h5py.File(h5path, "r") as h5:
        layer = 0
        for item in models.VGG16_CFG:
            if item == "M":
                n, h, w, c = x.shape
                x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
                continue
            name = models.KERAS_CONV_LAYERS[layer]
            layer += 1
            k, b = h5[name][f"{name}_W_1:0"][()], h5[name][f"{name}_b_1:0"][()]
            n, h, w, c = x.shape
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            cols = np.stack([padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=3)
            x = np.maximum(cols.reshape(n, h, w, 9 * c) @ k.reshape(9 * c, -1) + b, 0)
        x = x.reshape(len(x), -1)
        for name in ("fc1", "fc2"):
            x = np.maximum(x @ h5[name][f"{name}_W_1:0"][()] + h5[name][f"{name}_b_1:0"][()], 0)
    return x


def test_keras_h5_maps_onto_torch_layout(random_vgg16, pixels, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("w") / models.VGG16_KERAS_FILE
    _write_keras_h5(random_vgg16, path)
    net, _ = models.build("vgg16", weights=str(path))
    with torch.no_grad():
        got = net(torch.from_numpy(pixels)).numpy()
    expected = _numpy_vgg16_fc2_nhwc(path, pixels)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_not_a_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "vgg16.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(RisError, match="not a VGG16 weights file"):
        models.build("vgg16", weights=str(bad))
    with pytest.raises(RisError, match="weights file not found"):
        models.build("vgg16", weights=str(tmp_path / "missing.pth"))


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def file_server(tmp_path: Path):
    """A real HTTP server on loopback serving tmp_path."""
    handler = lambda *a, **kw: _Files(*a, directory=str(tmp_path), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


def test_download_checks_sha256_before_keeping(file_server, tmp_path_factory) -> None:
    base, root = file_server
    payload = b"pretend these are weights" * 1000
    (root / "w.pth").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path_factory.mktemp("cache")
    kept = models.download_weights(f"{base}/w.pth", digest[:8], cache / "w.pth")
    assert kept.read_bytes() == payload
    with pytest.raises(RisError, match="wrong SHA-256"):
        models.download_weights(f"{base}/w.pth", "00000000", cache / "other.pth")
    assert [p.name for p in cache.iterdir()] == ["w.pth"]  # nothing of the refused download is left


def test_offline_without_weights_says_how_to_supply_them(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RIS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "VGG16_TORCHVISION_URL", "http://127.0.0.1:9/vgg16-397923af.pth")  # closed port
    with pytest.raises(RisError, match=r"pass --weights .*vgg16-397923af\.pth.*vgg16_weights_tf_dim_ordering"):
        models.build("vgg16")


def test_onnx_runtime_matches_pytorch_and_int8_stays_close(pixels) -> None:
    """int8 stays close to fp32 on any CPU: before 7-bit weights in the dense convs (runtime._int8_plan),
    int16 saturation on CPUs without VNNI took these images' features down to cosine 0.74-0.93."""
    eager, digest = runtime.load_extractor(device="cpu", runtime="torch")
    fp32, digest32 = runtime.load_extractor(device="cpu", precision="fp32")
    assert digest == digest32
    ref = eager(pixels)
    assert ref.shape == (2, models.feature_dims("efficientnet-lite0", models.DEFAULT_POOLING)) == (2, 11520)
    assert _cos(fp32(pixels), ref).min() > 0.9999
    for cpu_runtime in ("openvino", "onnx"):
        int8, _ = runtime.load_extractor(device="cpu", precision="int8", runtime=cpu_runtime)
        cos = _cos(int8(pixels), ref)
        assert cos.min() > 0.98, (cpu_runtime, cos)


def test_streamed_batches_get_the_features_a_query_gets() -> None:
    """An indexing run's batches go to OpenVINO streams (OpenVinoExtractor.submit), queries to one request on
    every thread: an image must get the same vector either way, whichever batch it was in and whenever its
    features are fetched (a stream is reused only once its batch's features are kept)."""
    ext, _ = runtime.load_extractor(device="cpu", runtime="openvino", threads=2)
    assert isinstance(ext, runtime.OpenVinoExtractor) and ext.streams == 2 and ext.in_flight == 4
    x = np.stack([decode_file(str(f), 224).pixels for f in caltech_files("airplanes", 7) + caltech_files("panda", 5)])
    batches = [x[:2], x[2:4], x[4:7], x[7:9], x[9:]]
    fetches = [ext.submit(b) for b in batches]  # five on four requests: the first is kept before its reuse
    got = [fetch() for fetch in reversed(fetches)][::-1]
    for batch, features in zip(batches, got, strict=True):
        alone = np.concatenate([ext(batch[i : i + 1]) for i in range(len(batch))])
        assert features.shape == (len(batch), 11520)
        np.testing.assert_array_equal(features, alone)
    assert not np.array_equal(got[0][:3], got[1][:3])  # other images, other features
    np.testing.assert_array_equal(ext.submit(x[:1])(), ext(x[:1]))  # one image: the query path itself


def test_an_indexing_runs_batches_come_out_projected_once_the_projection_is_fitted() -> None:
    """OpenVINO projects an indexing run's batches itself once the collection's projection exists (bfloat16 where
    the CPU has it): what ris.vectors.reduce.Projection gives on the host, to the stored bfloat16's precision;
    raw features before the fit and for queries."""
    from ris.vectors.reduce import Projection

    ext, _ = runtime.load_extractor(device="cpu", runtime="openvino", threads=2)
    x = np.stack([decode_file(str(f), 224).pixels for f in caltech_files("airplanes", 8) + caltech_files("panda", 8)])
    raw = ext(x)
    fitted: list[Projection] = []
    view = ext.projecting(lambda: fitted[0] if fitted else None)
    np.testing.assert_array_equal(view.submit(x[:4])(), raw[:4])  # nothing fitted yet
    fitted.append(Projection.fit(raw, 12))
    on_host = fitted[0](raw)
    for got, want in ((view.submit(x[4:])(), on_host[4:]), (view(x[:3]), on_host[:3])):
        assert got.shape == want.shape == (len(want), 12)
        assert np.abs(got - want).max() < 2**-7 * np.abs(want).max()
    assert ext(x[:1]).shape == (1, 11520) and view.dim == 11520  # the original still gives raw features


def test_device_selection_degrades_to_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert runtime.resolve_device("auto") == "cpu"
    with pytest.raises(RisError, match="sees no CUDA GPU"):
        runtime.resolve_device("cuda")
    with pytest.raises(RisError, match="unknown device"):
        runtime.resolve_device("tpu")
    with pytest.raises(RisError, match="needs a GPU"):
        runtime.load_extractor(device="cpu", precision="bf16")


def test_torch_extractor_autocast_matches_fp32(pixels) -> None:
    """The GPU path's dtype handling, exercised on the CPU: bf16 autocast stays close to fp32."""
    net, _ = models.build("efficientnet-lite0")
    fp32 = torch_runtime.TorchExtractor(net, "efficientnet-lite0", 224, 11520, "cpu", "fp32")(pixels)
    bf16 = torch_runtime.TorchExtractor(net, "efficientnet-lite0", 224, 11520, "cpu", "bf16")(pixels)
    assert bf16.dtype == np.float32 and _cos(bf16, fp32).min() > 0.98


def test_gpu_decode_path_degrades_to_the_cpu_decoder(pixels) -> None:
    """Without a GPU (or torchvision) the device-decode stage hands every file to the CPU decoder."""
    from ris.extract import pipeline as extract

    files = caltech_files("panda", 2)
    todo = {f"sha{i}": f.read_bytes() for i, f in enumerate(files)}
    todo["bad"] = b"\xff\xd8\xff" + b"\x00" * 100  # a broken JPEG
    shas, batch, failures = extract._device_inputs(todo, 224, "cpu")
    assert shas == ["sha0", "sha1"] and list(failures) == ["bad"]
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (2, 224, 224, 3)
    assert np.array_equal(batch.numpy(), pixels)  # same pixels as the worker decoder makes
    image_id, sha, data, error, _ = extract._read_job((7, str(files[0]), 224))
    assert (image_id, error) == (7, None) and data == files[0].read_bytes() and sha == hashlib.sha256(data).hexdigest()


def _hide_prebuilt(monkeypatch: pytest.MonkeyPatch, empty: Path) -> None:
    monkeypatch.setattr(models, "PREBUILT_DIR", empty)
    models.prebuilt_models.cache_clear()


@pytest.mark.timeout(900)
def test_shipped_model_matches_a_fresh_export(monkeypatch, tmp_path: Path) -> None:
    """A first run without the shipped file exports, calibrates and compiles (reporting each step), and
    gives the same features as the shipped file, which is therefore what this code would build today."""
    shipped = models.prebuilt_models()
    assert [(p.model, p.pooling, p.precision) for p in shipped] == [("efficientnet-lite0", "grid3", "int8")]
    assert shipped[0].export_version == runtime.EXPORT_VERSION  # a bumped export version needs a rebuild
    assert shipped[0].weights_sha256 == models.file_sha256(models.lite_weights_path("efficientnet-lite0"))
    files = [f for cls in ("panda", "airplanes", "sunflower", "cup") for f in caltech_files(cls, 4)]
    pixels = np.stack([decode_file(str(f), 224).pixels for f in files])

    monkeypatch.setenv("RIS_CACHE_DIR", str(tmp_path / "cache"))
    _hide_prebuilt(monkeypatch, tmp_path / "nothing-shipped")
    events: list[runtime.Preparing] = []
    try:
        with runtime.preparation_listener(events.append):
            fresh, digest = runtime.load_extractor(device="cpu", precision="int8")
    finally:
        monkeypatch.undo()
        models.prebuilt_models.cache_clear()
    assert digest == shipped[0].weights_sha256
    starts = [(e.step, e.index, e.steps) for e in events if e.total == 0 and e.step != "ready"]
    assert starts == [("export", 1, 3), ("calibrate", 2, 3), ("compile", 3, 3)]
    assert [(e.done, e.total) for e in events if e.step == "calibrate"] == [(0, 0), *((n, 4) for n in range(5))]
    assert events[-1].step == "ready" and events[-1].seconds > 0

    monkeypatch.setenv("RIS_CACHE_DIR", str(tmp_path / "cache2"))
    with runtime.preparation_listener(events.append):
        events.clear()
        ours, _ = runtime.load_extractor(device="cpu", precision="int8")
    assert [e.step for e in events] == ["compile", "ready"]  # nothing exported: the shipped file is used
    cos = _cos(fresh(pixels), ours(pixels))
    assert cos.min() >= 0.99, cos


def test_default_model_runs_without_pytorch(tmp_path: Path) -> None:
    """The default job's model (shipped, int8, OpenVINO) loads and runs without importing PyTorch, and says
    it is compiling only the first time."""
    script = (
        "import sys, numpy as np\n"
        "from ris.model import runtime\n"
        "from ris.model.registry import cache_dir  # a from-import must not pull in the networks (PyTorch)\n"
        "for attempt in (1, 2):\n"
        "    seen = []\n"
        "    with runtime.preparation_listener(seen.append):\n"
        "        ext, _ = runtime.load_extractor(device='cpu', precision='int8')\n"
        "    print(attempt, [e.step for e in seen], ext(np.zeros((2, 224, 224, 3), np.uint8)).shape)\n"
        "print('torch' in sys.modules, 'efficientnet_lite_pytorch' in sys.modules)\n"
    )
    env = {**os.environ, "RIS_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["1 ['compile', 'ready'] (2, 11520)", "2 [] (2, 11520)", "False False"]


def test_missing_extra_is_one_clear_line(monkeypatch) -> None:
    from ris import extras

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(RisError, match=r'needs onnxruntime, which is not installed: pip install "ris\[models\]"'):
        extras.require("onnxruntime.quantization", "int8 calibration", "models")
    with pytest.raises(RisError, match=r"ONNX Runtime .*needs onnxruntime.*ris\[models\]"):
        runtime.OnnxExtractor(Path("any.onnx"), "efficientnet-lite0", 224, 11520, 1)
