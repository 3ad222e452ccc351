"""Feature cache: run the frozen VAE and text encoder once over a data source, then train from their outputs.

``python -m datamodules.cache --config CONFIG.yaml --out DIR`` builds the model and the data source from the YAML
that trains, encodes the source's train split (``--split val``: its val split) and writes to ``DIR``:

- ``shard-{rank:05d}-{k:05d}.safetensors``, per item in data set order: ``latent_mean`` and ``latent_std``
  (N, C, h, w), the VAE posterior scaled like ``LatentVAE.encode`` (``PixelSpace``: the image and zeros);
  ``text_features`` (N, L, D); ``text_mask`` (N, L) bool; ``height`` and ``width`` (N,) int64, the image size in
  pixels; ``index`` (N,) int64, the item's index in the data set. The metadata key ``captions`` holds the
  captions as a JSON list. Latents and features are stored in ``dtype`` (default float32, the encoders' output
  dtype; bfloat16 or float16 halve the size) and read back as float32.
- ``manifest-{rank:05d}.json`` when writer ``rank`` has finished: its shards and their counts, the data set's
  length and resolution, the storage dtype and the identity of both encoders (class, pretrained id and a probe
  output), so that a cache built with other encoders can be detected (``CachedFeaturesSource.check_encoders``).

Writer ``rank`` of ``world_size`` encodes the items i with ``i % world_size == rank``; its shard k holds its items
``k * shard_size`` to ``(k + 1) * shard_size - 1``. Several processes or GPUs (``torchrun --nproc_per_node 8 -m
datamodules.cache ...``) thus write disjoint shards, and the reader maps an index to its shard and row directly.
``CachedFeaturesSource`` serves the cache in data set order as a ``CaptionImageSource`` and gives the module
``CachedEncoders``, which reads the batches' stored features in place of the encoders: neither encoder runs.
"""

import argparse
import glob
import json
import os
import sys
import warnings

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from datamodules.caption_image import CaptionImageDataModule, CaptionImageSource, read_prompt_file
from lit_dimba.conditioning.text import DTYPES, parse_dtype
from lit_dimba.conditioning.vae import LatentVAE, PixelSpace
from lit_dimba.errors import ConfigError
from lit_dimba.modules import DiffusionModule

FLOAT_KEYS = ("latent_mean", "latent_std", "text_features")
ITEM_KEYS = FLOAT_KEYS + ("text_mask",)
PROBE_CAPTION = "a large red circle in the top left corner"
PROBE_TOLERANCE = 0.1  # relative L2 distance of probe outputs: covers bf16 vs fp32, not other weights or seeds
BUILD_HINT = "build it with `python -m datamodules.cache --config CONFIG.yaml --out {path}`"


# --------------------------------------------------------------------------------------------------- writing
def encoder_identity(module: DiffusionModule) -> dict:
    """Class, pretrained id, output sizes and a probe output of ``module.text_encoder`` and ``module.vae``.

    The probes are the first 16 feature values of ``PROBE_CAPTION`` and the first 16 latent-mean values of a fixed
    ramp image of 8 x 8 latent pixels, so encoders of the same class with other weights (another seed or
    checkpoint) are told apart.
    """
    text, vae = module.text_encoder, module.vae
    side = 8 * vae.downsample_factor
    ramp = torch.linspace(-1, 1, 3 * side * side).reshape(1, 3, side, side)
    mean, _ = vae.encode_distribution(ramp)
    text_identity = None
    if text is not None:
        features, _ = text([PROBE_CAPTION])
        text_identity = {"class": _class_name(text), "pretrained": _pretrained_id(getattr(text, "encoder", None)),
                         "max_length": text.max_length, "hidden_size": text.hidden_size,
                         "probe": features.flatten()[:16].cpu().tolist()}
    return {
        "text_encoder": text_identity,
        "vae": {"class": _class_name(vae), "pretrained": _pretrained_id(getattr(vae, "vae", None)),
                "latent_channels": vae.latent_channels, "downsample_factor": vae.downsample_factor,
                "probe": mean.flatten()[:16].cpu().tolist()},
    }


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _pretrained_id(model) -> str | None:
    """The hub id or folder a transformers/diffusers model was loaded from; None when built from a config."""
    config = getattr(model, "config", None)
    name = config.get("_name_or_path") if isinstance(config, dict) else getattr(config, "_name_or_path", None)
    return name or None


def identity_differences(cached: dict, current: dict) -> list[str]:
    """Human-readable differences between two ``encoder_identity`` results (empty when they match).

    Pretrained ids are not compared (a hub id and a local copy are the same model): class, sizes and probes are.
    A model without a text encoder (``text_encoder: null``, trained from the cache alone) is not compared on it.
    """
    differences = []
    for name in ("text_encoder", "vae"):
        if current[name] is None:
            continue
        for key, theirs in cached[name].items():
            ours = current[name][key]
            if key == "probe":
                a, b = torch.tensor(theirs), torch.tensor(ours)
                if a.shape != b.shape or (a - b).norm() > PROBE_TOLERANCE * b.norm() + 1e-6:
                    differences.append(f"{name} gives other outputs (other weights or seed)")
            elif key != "pretrained" and theirs != ours:
                differences.append(f"{name}.{key} is {theirs!r} in the cache but {ours!r} in the model")
    return differences


class _ShardBuffer:
    """Encoded rows of one writer; writes every full shard of ``shard_size`` rows, and the rest on ``flush``."""

    def __init__(self, out_dir: str, rank: int, shard_size: int):
        self.out_dir, self.rank, self.shard_size = out_dir, rank, shard_size
        self.tensors: dict[str, list[Tensor]] = {}
        self.captions: list[str] = []
        self.shards: list[dict] = []

    def add(self, rows: dict[str, Tensor], captions: list[str]) -> None:
        """Append B rows (every tensor (B, ...)) and their captions; write the shards they complete."""
        for key, value in rows.items():
            self.tensors.setdefault(key, []).append(value)
        self.captions.extend(captions)
        while len(self.captions) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        """Write the remaining rows (a last, shorter shard)."""
        if self.captions:
            self._write(len(self.captions))

    def _write(self, count: int) -> None:
        """Write the first ``count`` buffered rows as the next shard."""
        tensors = {}
        for key, parts in self.tensors.items():
            rows = torch.cat(parts)
            tensors[key] = rows[:count].contiguous()
            self.tensors[key] = [rows[count:]]
        captions, self.captions = self.captions[:count], self.captions[count:]
        name = f"shard-{self.rank:05d}-{len(self.shards):05d}.safetensors"
        path = os.path.join(self.out_dir, name)
        save_file(tensors, path + ".tmp", metadata={"captions": json.dumps(captions)})
        os.replace(path + ".tmp", path)  # a shard exists only once it is complete
        self.shards.append({"file": name, "count": count})


def write_feature_cache(module: DiffusionModule, dataset: Dataset, out_dir: str, shard_size: int = 1024,
                        batch_size: int = 16, rank: int = 0, world_size: int = 1, progress: bool = True,
                        dtype: str = "float32", num_workers: int = 0, max_items: int | None = None) -> dict:
    """Encode this writer's items of ``dataset`` with ``module``'s frozen encoders into safetensors shards.

    Args:
        module: a ``DiffusionModule`` (only ``text_encoder`` and ``vae`` run, on the devices they are on).
        dataset: map-style, items ``{"image": (3, H, W) float in [-1, 1], "caption": str}``, all of one size.
        out_dir: the cache folder (created); it must not hold this rank's files yet.
        shard_size: items per shard file.
        batch_size, num_workers: of the DataLoader that feeds the encoders.
        rank, world_size: this writer encodes items i with ``i % world_size == rank``.
        progress: show a tqdm progress bar.
        dtype: storage dtype of latents and text features (``float32``, ``bfloat16`` or ``float16``).
        max_items: cache only the first ``max_items`` items of ``dataset`` (all writers must pass the same).

    Returns the manifest written to ``out_dir/manifest-{rank:05d}.json``.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
    module.require_text_encoder("the feature cache encodes the captions")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
    storage = parse_dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, f"manifest-{rank:05d}.json")
    stale = sorted(glob.glob(os.path.join(out_dir, f"shard-{rank:05d}-*"))) + glob.glob(manifest_path)
    if stale:
        raise ConfigError(f"{out_dir!r} already holds files of writer {rank} ({os.path.basename(stale[0])}); "
                          "delete them or write to an empty folder")
    if isinstance(dataset, IterableDataset):
        raise ConfigError(f"the feature cache needs a map-style data set (with a length and an index); "
                          f"{type(dataset).__name__} is a stream: use a source that is not streaming")
    num_items = len(dataset) if max_items is None else min(len(dataset), max_items)
    indices = range(rank, num_items, world_size)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    buffer = _ShardBuffer(out_dir, rank, shard_size)
    resolution, done = None, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"feature cache, writer {rank}/{world_size}", disable=not progress):
            images, captions = batch["image"], list(batch["caption"])
            B, _, H, W = images.shape
            if resolution is None:
                resolution = [H, W]
            elif resolution != [H, W]:
                raise ConfigError(f"the data set's items have different sizes ({resolution[0]}x{resolution[1]} "
                                  f"and {H}x{W}); the feature cache needs one resolution")
            mean, std = module.vae.encode_distribution(images)
            features, mask = module.text_encoder(captions)
            buffer.add({
                "latent_mean": mean.to("cpu", storage), "latent_std": std.to("cpu", storage),
                "text_features": features.to("cpu", storage), "text_mask": mask.cpu(),
                "height": torch.full((B,), H), "width": torch.full((B,), W),
                "index": torch.tensor(indices[done:done + B]),
            }, captions)
            done += B
    buffer.flush()
    manifest = {"rank": rank, "world_size": world_size, "num_items": num_items, "shard_size": shard_size,
                "count": done, "resolution": resolution, "dtype": dtype, "encoders": encoder_identity(module),
                "shards": buffer.shards}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest


# --------------------------------------------------------------------------------------------------- reading
def read_manifest(path: str) -> dict:
    """Merge and check the manifests of every writer of the cache in ``path``.

    Returns ``{"path", "world_size", "num_items", "shard_size", "resolution": [H, W], "encoders",
    "files": [[shard file of writer r, ...] for r in range(world_size)]}``. Raises ConfigError for a missing
    or empty folder, a writer that did not finish and writers run with different settings.
    """
    files = sorted(glob.glob(os.path.join(path, "manifest-*.json")))
    if not files:
        what = "is empty (no manifest-*.json)" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"the feature cache {path!r} {what}; {BUILD_HINT.format(path=path)}")
    manifests = []
    for file in files:
        with open(file) as f:
            manifests.append(json.load(f))
    first = manifests[0]
    for manifest, file in zip(manifests[1:], files[1:]):
        for key in ("world_size", "num_items", "shard_size", "dtype"):
            if manifest[key] != first[key]:
                raise ConfigError(f"{file} has {key}={manifest[key]!r} but {files[0]} has {first[key]!r}; the "
                                  "writers of one cache must share their settings: rebuild it into an empty folder")
        if identity_differences(first["encoders"], manifest["encoders"]):
            raise ConfigError(f"{file} and {files[0]} were written with different encoders; rebuild the cache "
                              "into an empty folder")
    world_size, num_items = first["world_size"], first["num_items"]
    by_rank = {manifest["rank"]: manifest for manifest in manifests}
    missing = sorted(set(range(world_size)) - set(by_rank))
    if missing:
        raise ConfigError(f"the feature cache {path!r} lacks writer(s) {missing} of world_size {world_size} (no "
                          f"manifest-{missing[0]:05d}.json: the writer did not finish); run `python -m "
                          f"datamodules.cache ... --rank {missing[0]} --world_size {world_size}` for each")
    for rank, manifest in by_rank.items():
        expected = len(range(rank, num_items, world_size))
        if manifest["count"] != expected or sum(shard["count"] for shard in manifest["shards"]) != expected:
            raise ConfigError(f"manifest-{rank:05d}.json in {path!r} lists {manifest['count']} items, expected "
                              f"{expected}; rebuild the cache into an empty folder")
    resolution = next((m["resolution"] for m in manifests if m["resolution"] is not None), None)
    if resolution is None:
        raise ConfigError(f"the feature cache {path!r} holds no items; {BUILD_HINT.format(path=path)}")
    return {"path": path, "world_size": world_size, "num_items": num_items, "shard_size": first["shard_size"],
            "resolution": resolution, "encoders": first["encoders"],
            "files": [[shard["file"] for shard in by_rank[r]["shards"]] for r in range(world_size)]}


class CachedFeatures(Dataset):
    """Items ``start`` to ``stop - 1`` (data set order) of a feature cache.

    Item i: ``{"latent_mean", "latent_std": (C, h, w) float32, "text_features": (L, D) float32, "text_mask": (L,)
    bool, "caption": str}``. Shards are opened lazily (memory-mapped, one handle per shard and process) and each
    item reads only its own rows.
    """

    def __init__(self, manifest: dict, start: int = 0, stop: int | None = None):
        self.manifest = manifest
        self.start = start
        self.stop = manifest["num_items"] if stop is None else stop
        self._open: dict[str, tuple] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} cached items")
        index = self.start + i
        world_size, shard_size = self.manifest["world_size"], self.manifest["shard_size"]
        position = index // world_size  # the item's place among its writer's items
        file = self.manifest["files"][index % world_size][position // shard_size]
        handle, captions = self._shard(file)
        row = position % shard_size
        item = {key: handle.get_slice(key)[row] for key in ITEM_KEYS}
        for key in FLOAT_KEYS:
            item[key] = item[key].float()
        item["caption"] = captions[row]
        return item

    def _shard(self, file: str) -> tuple:
        """The open safetensors handle of a shard and its captions."""
        if file not in self._open:
            handle = safe_open(os.path.join(self.manifest["path"], file), framework="pt")
            self._open[file] = (handle, json.loads(handle.metadata()["captions"]))
        return self._open[file]

    def __getstate__(self) -> dict:
        """Handles are not picklable (DataLoader workers under spawn): each process opens its own."""
        return {**self.__dict__, "_open": {}}


class CachedEncoders:
    """The encoders' interface (``lit_dimba.conditioning.encoders.BatchEncoders``) for batches of this cache:
    ``latent_mean`` and ``latent_std`` (B, C, h, w), ``text_features`` (B, L, D), ``text_mask`` (B, L).

    The latents follow the VAE's sample policy (``vae.posterior_latents``, as online): the mean, or with
    ``vae.sample_posterior`` a fresh draw mean + std * N(0, 1) at every step, from ``generator``.
    """

    def __init__(self, vae: LatentVAE | PixelSpace):
        self.vae = vae

    @torch.no_grad()
    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        latents = self.vae.posterior_latents(batch["latent_mean"], batch["latent_std"], generator)
        return latents, batch["text_features"], batch["text_mask"]

    def image_size(self, batch: dict) -> tuple[int, int]:
        height, width = batch["latent_mean"].shape[-2:]
        return height * self.vae.downsample_factor, width * self.vae.downsample_factor


class CachedFeaturesSource(CaptionImageSource):
    """Train from a feature cache written by ``python -m datamodules.cache`` (no encoder runs in training).

    Args:
        path: the cache folder.
        val_path: a cache of validation items (``--split val``); without it the last ``num_val`` items of
            ``path`` are the validation set and the others the training set.
        num_val: see ``val_path`` (ignored with it).
        test_prompts: a text file, one prompt per line, for ``test``.
    """

    def __init__(self, path: str, val_path: str | None = None, num_val: int = 0, test_prompts: str | None = None):
        self.path = path
        self.val_path = val_path
        self.num_val = num_val
        self.test_prompt_file = test_prompts

    def _manifest(self, path: str, resolution: int) -> dict:
        """The cache's merged manifest, after checking it holds images of ``resolution``."""
        manifest = read_manifest(path)
        height, width = manifest["resolution"]
        if (height, width) != (resolution, resolution):
            raise ConfigError(f"the feature cache {path!r} holds {height}x{width} images but data.resolution="
                              f"{resolution}; set data.resolution={height} or rebuild the cache at {resolution} "
                              f"(python -m datamodules.cache ... --data.init_args.resolution {resolution})")
        return manifest

    def _train_items(self, manifest: dict) -> int:
        """Number of training items at the start of ``path``'s cache (the rest is validation)."""
        num_val = 0 if self.val_path else self.num_val
        if not 0 <= num_val < manifest["num_items"]:
            raise ConfigError(f"num_val={num_val} must be in [0, {manifest['num_items']}) for the feature cache "
                              f"{self.path!r} of {manifest['num_items']} items")
        return manifest["num_items"] - num_val

    def train_dataset(self, resolution: int, rank: int = 0, world_size: int = 1,
                      buckets: list[tuple[int, int]] | None = None) -> CachedFeatures:
        """All training items (map-style: Lightning's sampler splits them over ranks)."""
        if buckets:
            raise ConfigError("a feature cache holds one resolution, not aspect-ratio buckets; set data.buckets: "
                              "false")
        manifest = self._manifest(self.path, resolution)
        return CachedFeatures(manifest, 0, self._train_items(manifest))

    def val_dataset(self, resolution: int) -> CachedFeatures:
        if self.val_path:
            return CachedFeatures(self._manifest(self.val_path, resolution))
        if self.num_val <= 0:
            raise ConfigError("CachedFeaturesSource has no validation data; set source.init_args.val_path (a cache "
                              "written with --split val) or num_val > 0, or trainer.limit_val_batches=0")
        manifest = self._manifest(self.path, resolution)
        return CachedFeatures(manifest, self._train_items(manifest))

    def test_prompts(self) -> list[dict]:
        if self.test_prompt_file is None:
            raise ConfigError("CachedFeaturesSource has no test prompts; set source.init_args.test_prompts to a "
                              "text file with one prompt per line")
        return [{"caption": prompt} for prompt in read_prompt_file(self.test_prompt_file)]

    def encoders(self, module: DiffusionModule) -> CachedEncoders:
        """Read the cached features in place of ``module``'s encoders, after checking they are those the cache was
        built with (``check_encoders``)."""
        self.check_encoders(module)
        return CachedEncoders(module.vae)

    def check_encoders(self, module: DiffusionModule) -> None:
        """Raise ConfigError unless ``module``'s text encoder and VAE are those the cache was built with."""
        differences = identity_differences(read_manifest(self.path)["encoders"], encoder_identity(module))
        if differences:
            raise ConfigError(f"the feature cache {self.path!r} was built with other encoders: "
                              f"{'; '.join(differences)}; rebuild it with this model's config, or train with the "
                              "config it was built from")


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The cache options, and the remaining ``--key value`` options (config overrides for the model and data)."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.cache",
        description="Encode a data source with the frozen VAE and text encoder of a training config into a feature "
                    "cache. Other --key value options override the config as in main.py "
                    "(e.g. --data.init_args.resolution 512).")
    parser.add_argument("--config", action="append", required=True, help="training YAML (repeatable, as main.py)")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="which split of data.source")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)), help="default: env RANK")
    parser.add_argument("--world_size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                        help="default: env WORLD_SIZE")
    parser.add_argument("--shard_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--max_items", type=int, default=None, help="cache only the first N items of the split")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype of the features")
    return parser.parse_known_args(argv)


class ModelAndDataCLI(LightningCLI):
    """LightningCLI that instantiates the model and the data of a config only: no Trainer, devices or strategy. It
    reads ``configs/base.yaml`` first and knows its callback keys, as main.py does, so every training config
    parses."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from main import add_base_callback_arguments

        add_base_callback_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str]) -> None:
        """Parse ``args``; sys.argv holds this command's own options, so LightningCLI's warning about it is moot."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)

    def instantiate_trainer(self, **kwargs) -> None:
        return None


def main(argv: list[str] | None = None) -> None:
    # main.py is a script at the repository root, not part of the installed packages: only the command needs it.
    from main import BASE_CONFIG, OneLineErrorParser, config_error_in

    args, overrides = parse_args(argv)
    configs = [option for path in args.config for option in ("--config", path)]
    try:
        cli = ModelAndDataCLI(DiffusionModule, CaptionImageDataModule, subclass_mode_model=True,
                              subclass_mode_data=True, parser_class=OneLineErrorParser, run=False,
                              save_config_callback=None,
                              parser_kwargs={"prog": "python -m datamodules.cache",
                                             "default_config_files": [BASE_CONFIG]},
                              args=[*configs, *overrides, "--trainer.logger=false", "--trainer.callbacks=[]"])
        module, data = cli.model, cli.datamodule
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
            module.text_encoder.to(device)
            module.vae.to(device)
        split = data.source.train_dataset if args.split == "train" else data.source.val_dataset
        manifest = write_feature_cache(module, split(data.resolution), args.out, args.shard_size, args.batch_size,
                                       args.rank, args.world_size, dtype=args.dtype, num_workers=args.num_workers,
                                       max_items=args.max_items)
    except ValueError as error:
        cause = config_error_in(error)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")
    print(f"wrote {manifest['count']} of {manifest['num_items']} items ({args.split}) in {len(manifest['shards'])} "
          f"shards to {args.out} (writer {args.rank} of {args.world_size})")


if __name__ == "__main__":
    main()
