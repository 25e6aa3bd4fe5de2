"""CIFAR-10 with a ResNet-18-style network and cross-replica BatchNorm.

Data: `data.path` names the folder of the standard CIFAR-10 python batches
(`cifar-10-batches-py`: `data_batch_1` .. `data_batch_5`, `test_batch`), the folder of its
binary version (`cifar-10-batches-bin`: `data_batch_1.bin` .. `data_batch_5.bin`,
`test_batch.bin`, records of a label byte and 3072 pixel bytes), or an `.npz` with
`x_train` `[N, 32, 32, 3]` uint8, `y_train`, `x_test`, `y_test`. The python batches are
pickles, and a pickle can run any code as it is loaded: they are read by an unpickler that
admits only the dicts, lists, strings, numbers and numpy arrays the format holds, so any
other file is refused in one line and nothing in it runs (`python -m jaxdist.explain` reads
`data.path` from a workdir's `config.json`, which anyone may have written). Without it, a
small learnable synthetic set in the same format is generated (and one line says so): 10
classes, each a fixed random smooth colour pattern, every image a randomly shifted, noisy
copy of its class's pattern.
Training images are randomly cropped (4-pixel padding) and flipped on the host, per
example, deterministically from the seed. BatchNorm statistics are averaged over all
devices with the core's exact weighting (padding excluded), so the running statistics are
the same on every device.

Command:   python -m jaxdist.run cifar_resnet       # synthetic, CPU-sized
           python -m jaxdist.run cifar_resnet data.path=/data/cifar-10-batches-py
               model.width=64 train.steps=20000 train.batch_size=512     # CIFAR-10, a GPU
Runtime:   about 80 s on a 2-core CPU with 8 fake devices (width 8, 300 steps of 64),
           compilation included (measured 2026-11-27 by `python scripts/bench_experiments.py`).
Result:    synthetic set: test accuracy 0.97 (the final `eval` line).
           CIFAR-10 itself was not run here (no GPU and no download on this machine).
"""

from __future__ import annotations

import functools
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.data.augment import random_crop, random_flip
from jaxdist.step.losses import accuracy, check_labels, cross_entropy
from jaxdist.step.models.resnet import ResNet
from jaxdist.step.precision import compute_dtype

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@dataclass
class ResNetConfig:
    """The network's size and the loss."""

    width: int = 8  # 64 is ResNet-18
    blocks: int = 2  # per stage
    label_smoothing: float = 0.0


@dataclass
class CifarDataConfig:
    """Where the images come from."""

    path: str = ""  # CIFAR-10 python or binary batches folder, or .npz; empty: synthetic
    synthetic_train: int = 2048
    synthetic_test: int = 512


def config() -> Config:
    """A CPU-sized run on the synthetic set: 300 steps of 64 images."""
    return Config(
        train=TrainConfig(steps=300, batch_size=64, log_every=50, eval_every=150,
                          checkpoint_every=150),
        optimizer=OptimizerConfig(name="momentum", learning_rate=0.1, momentum=0.9,
                                  weight_decay=5e-4, schedule="warmup_cosine",
                                  warmup_steps=30),
        model=ResNetConfig(),
        data=CifarDataConfig(),
    )


def tiny_config() -> Config:
    """A few seconds' version for the test suite (8 fake CPU devices)."""
    return apply_overrides(config(), [
        "train.steps=12", "train.batch_size=32", "train.log_every=4", "train.eval_every=0",
        "model.width=4", "model.blocks=1", "data.synthetic_train=256",
        "data.synthetic_test=64", "optimizer.warmup_steps=0", "optimizer.learning_rate=0.05"])


PYTHON_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PIXELS = 3 * 32 * 32  # one image, channel-planar: 1024 red, 1024 green, 1024 blue bytes


def load_cifar(path: str) -> tuple[dict, dict]:
    """Train and test arrays from a CIFAR-10 python or binary batches folder or an .npz file.

    Images are `[N, 32, 32, 3]` uint8, labels integers. The python batches are read by
    `SafeUnpickler`, never by plain `pickle`: a file that is anything else is refused.
    """
    root = Path(path)
    if root.is_file() and root.suffix == ".npz":
        with np.load(root, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise UserError(f"{root} lacks {', '.join(sorted(missing))}")
            return ({"image": f["x_train"], "label": f["y_train"]},
                    {"image": f["x_test"], "label": f["y_test"]})
    if (root / "data_batch_1").is_file():
        names, read = PYTHON_BATCHES, read_python_batch
    elif (root / "data_batch_1.bin").is_file():
        names, read = [f"{name}.bin" for name in PYTHON_BATCHES], read_binary_batch
    else:
        raise UserError(f"data.path={path} is neither an .npz nor a folder holding the "
                        f"CIFAR-10 python batches (data_batch_1 .. data_batch_5, test_batch) "
                        f"or binary batches (data_batch_1.bin .. data_batch_5.bin, "
                        f"test_batch.bin)")
    for name in names:
        if not (root / name).is_file():
            raise UserError(f"data.path={path} lacks {name}; give the whole CIFAR-10 folder")
    parts = [read(root / name) for name in names]
    images = [planar.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for planar, _ in parts]
    return ({"image": np.concatenate(images[:5]),
             "label": np.concatenate([labels for _, labels in parts[:5]])},
            {"image": images[5], "label": parts[5][1]})


def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`[N, 3072]` planar pixels and `[N]` labels of a binary batch: 1 + 3072 bytes a record."""
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % (1 + PIXELS):
        raise UserError(f"{path} is not a CIFAR-10 binary batch: its {raw.size} bytes are not "
                        f"a whole number of {1 + PIXELS}-byte records (a label byte, then "
                        f"{PIXELS} pixel bytes)")
    records = raw.reshape(-1, 1 + PIXELS)
    return records[:, 1:], records[:, 0].astype(np.int64)


class SafeUnpickler(pickle.Unpickler):
    """An unpickler of only what a CIFAR-10 python batch holds: dicts, lists, numbers, arrays.

    Strings, numbers, lists, tuples and dicts need no global; numpy arrays need the few
    numpy constructors `find_class` admits. Any other global (a function such as
    `os.system` or `exec`, any class) is refused, so a crafted file cannot run code.

    Each lookup returns a fresh wrapper of the numpy function, so a pickle's BUILD opcode
    aimed at it cannot change numpy's own function object.
    """

    def find_class(self, module: str, name: str) -> object:
        """The allowed numpy constructors; anything else is an `UnpicklingError`."""
        found = _unpickling_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        if isinstance(found, type):
            return found  # built-in types: a BUILD opcode cannot set their attributes
        return lambda *args: found(*args)


@functools.cache
def _unpickling_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array names (numpy 1 and 2 spell its module apart)."""
    # numpy's own pickles name these; taken from them so as not to import numpy.core
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray,
                                              ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What Python 3 pickles (protocol 2) write for bytes: `_codecs.encode(text, "latin1")`."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("it encodes text other than as latin1 bytes")
    return text.encode("latin1")


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`[N, 3072]` planar pixels and `[N]` labels of a python batch (a pickled dict)."""
    def refuse(why: str) -> UserError:
        return UserError(f"{path} is not a CIFAR-10 batch ({why}); give data.path the "
                         f"cifar-10-batches-py or cifar-10-batches-bin folder as downloaded")

    try:
        with path.open("rb") as f:
            raw = SafeUnpickler(f, encoding="bytes").load()
    except OSError as error:
        raise UserError(f"could not read {path} ({error.strerror})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, OverflowError, RecursionError) as error:
        raise refuse(f"not a readable batch pickle: {error}") from None
    if not isinstance(raw, dict):
        raise refuse(f"it holds a {type(raw).__name__}, not a dict")
    data = raw.get(b"data", raw.get("data"))
    labels = raw.get(b"labels", raw.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == PIXELS):
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise refuse(f"its data is {what}, not uint8 rows of {PIXELS} pixels")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    elif (isinstance(labels, list) and all(type(label) is int for label in labels)
          and all(-2**63 <= label < 2**63 for label in labels)):
        labels = np.asarray(labels, np.int64)
    else:
        raise refuse("its labels are not a list of integers")
    if len(labels) != len(data):
        raise refuse(f"{len(labels)} labels for {len(data)} images")
    return data, labels


def synthetic(train_size: int, test_size: int, seed: int = 0) -> tuple[dict, dict]:
    """A learnable CIFAR-format set: shifted, noisy copies of 10 smooth class patterns."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(64, 192, size=(10, 4, 4, 3))
    patterns = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)  # [10, 32, 32, 3]

    def make(n):
        labels = rng.integers(0, 10, size=n)
        shifts = rng.integers(-16, 16, size=(n, 2))  # anywhere: only the pattern tells
        images = np.stack([np.roll(patterns[c], tuple(s), axis=(0, 1))
                           for c, s in zip(labels, shifts, strict=True)])
        images = images + rng.normal(0, 100, size=images.shape)
        return {"image": np.clip(images, 0, 255).astype(np.uint8),
                "label": labels.astype(np.int32)}

    return make(train_size), make(test_size)


def build(config: Config) -> Experiment:
    """The ResNet, its BatchNorm state, the images and their augmentation."""
    m, d = config.model, config.data
    if d.path:
        train, test = load_cifar(d.path)
    else:
        print(f"cifar_resnet: no data.path given, using a synthetic CIFAR-format set "
              f"({d.synthetic_train} train / {d.synthetic_test} test images), not CIFAR-10",
              file=sys.stderr)
        train, test = synthetic(d.synthetic_train, d.synthetic_test)
    check_labels(train["label"], 10, "the CIFAR training data")
    check_labels(test["label"], 10, "the CIFAR test data")
    precision = config.train.precision
    dtype = compute_dtype(precision)
    model = ResNet(outputs=10, width=m.width, blocks=m.blocks, dtype=dtype)
    init_model = ResNet(outputs=10, width=m.width, blocks=m.blocks, axis_name=None)

    def normalize(images):
        return (images.astype(jnp.float32) / 255.0 - MEAN) / STD

    def init_variables(rng):
        dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
        return init_model.init(rng, dummy, jnp.ones(1), train=False)

    def loss_fn(params, model_state, batch, rng):
        logits, updated = model.apply(
            {"params": params, "batch_stats": model_state}, normalize(batch["image"]),
            batch["weight"], train=True, mutable=["batch_stats"])
        losses = cross_entropy(logits, batch["label"], m.label_smoothing)
        return losses, {"accuracy": accuracy(logits, batch["label"])}, updated["batch_stats"]

    def eval_fn(params, model_state, batch):
        logits = model.apply({"params": params, "batch_stats": model_state},
                             normalize(batch["image"]), batch["weight"], train=False)
        return cross_entropy(logits, batch["label"]), {"accuracy": accuracy(logits,
                                                                             batch["label"])}

    def logits(params, model_state, images):
        """Eval-mode logits of normalized images (what attributions are taken on)."""
        return model.apply({"params": params, "batch_stats": model_state}, images,
                           jnp.ones(images.shape[0]), train=False)

    def augment(batch, rng):
        return {**batch, "image": random_flip(random_crop(batch["image"], rng, 4), rng)}

    return Experiment(init_params=lambda rng: init_variables(rng)["params"],
                      init_model_state=lambda rng: init_variables(rng)["batch_stats"],
                      loss_fn=loss_fn, eval_fn=eval_fn, train_data=train, eval_data=test,
                      train_transform=augment, precision=precision,
                      explain=ExplainSpec(input="image", label="label", kind="image",
                                          features=lambda params, raw: normalize(raw),
                                          output=logits))
