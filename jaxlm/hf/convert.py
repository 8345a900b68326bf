"""`jaxlm convert`: local Hugging Face GPT-2/Llama/Mixtral directories <-> jaxlm exports.

from-hf writes the layout of `jaxlm export` (params/, config.yaml, export.json and the
tokenizer), so `runs.load_run`, eval, generate and finetune read it like any export.
to-hf writes `config.json`, `model.safetensors` (or, above `max_shard_bytes`, numbered
shards with `model.safetensors.index.json`) and the tokenizer files, which
`GPT2LMHeadModel` / `LlamaForCausalLM` / `MixtralForCausalLM.from_pretrained` load. Sources
and outputs may be local or in a bucket (gs://, s3://): a remote safetensors file is read
from a local cached copy, and a bucket output (which has no rename) is written in place,
export.json (from-hf) or config.json (to-hf) last.

to-hf restores the model sharded like every other command and streams it out one tensor
at a time: each is gathered from its shards (over every host of a multi-process job),
converted and added to the current shard file, so host memory holds at most one file's
worth of tensors. Only process 0 writes.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_dtypes  # comes with JAX; also teaches safetensors' numpy side bfloat16
import numpy as np
import sentencepiece as spm
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm import paths
from jaxlm.config import DataConfig, RunConfig, load_config, resolve, to_yaml, validate
from jaxlm.config.files import check_output_dir
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.hf.config import hf_config_from_model, hf_model_type, model_config_from_hf
from jaxlm.hf.weights import iter_params_to_hf, params_from_hf
from jaxlm.models.scan import unstack_blocks
from jaxlm.parallel.distributed import to_host
from jaxlm.paths import Path
from jaxlm.runs import EXPORT_INFO, abstract_params, load_run
from jaxlm.train import object_store

DTYPES = ("float32", "bfloat16")
# Tokenizer files, in order of preference: transformers itself prefers tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
ROLES = ("bos", "eos", "pad", "unk")
MAX_SHARD_BYTES = 2 * 1024**3  # to-hf's default safetensors file size before it splits


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read '{path}' as JSON ({e}); fix or replace the file.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a JSON object; fix or replace the file.")
    return data


def _np_dtype(name: str) -> Any:
    return np.float32 if name == "float32" else ml_dtypes.bfloat16


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}.")


def _check_new(output: Path) -> None:
    """Refuse an `output` that exists and is not an empty directory."""
    paths.check_reachable(output, "--output")  # a bucket is reached before it is listed
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output '{output}' already exists and is not empty; name a new one.")
    check_output_dir(output, "--output")


def _new_output(output: Path) -> Path:
    """A temporary directory beside `output`, which must not exist or be empty; on a bucket,
    `output` itself."""
    _check_new(output)
    if paths.is_remote(output):
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp, whose directory is 0700: the output keeps the user's umask.
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, output: Path, fill: Callable[[Path], None]) -> None:
    """Fill `tmp`, then rename it to `output`: a crash never leaves a half-written output.
    A bucket output is filled in place; its last file marks it complete."""
    if paths.is_remote(output):
        fill(output)
        return
    try:
        fill(tmp)
        if output.exists():
            output.rmdir()  # empty, checked by _new_output
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- reading HF


class SafetensorsWeights(Mapping[str, np.ndarray]):
    """The tensors of `model.safetensors` or of its shards, each read only when asked for.

    Reading lazily keeps the peak memory of a conversion near one copy of the model.
    """

    def __init__(self, src: Path) -> None:
        index = src / "model.safetensors.index.json"
        if (src / "model.safetensors").is_file():
            files = [src / "model.safetensors"]
        elif index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            files = [src / name for name in sorted(set(weight_map.values()))]
        else:
            other = sorted(p.name for p in (*src.glob("*.bin"), *src.glob("*.pt")))
            hint = f" (found {other[0]}: re-save it with save_pretrained)" if other else ""
            raise ConfigError(
                f"'{src}' has no model.safetensors or model.safetensors.index.json{hint}; only "
                f"safetensors weights are read."
            )
        self._where: dict[str, Any] = {}
        for path in files:
            if not path.is_file():
                raise ConfigError(f"The shard '{path}' named in {index.name} is missing; fetch it.")
            try:  # safetensors maps a local file: a remote shard is read from a cached copy
                handle = safe_open(str(paths.local_copy(path, None)), framework="numpy")
            except Exception as e:  # safetensors raises its own error type for a bad header
                raise ConfigError(
                    f"'{path}' is not a readable safetensors file ({str(e).splitlines()[0]}); "
                    f"download or save it again."
                ) from None
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _tokenizer_file(src: Path) -> Path | None:
    """The directory's tokenizer: tokenizer.json (what transformers uses) before .model."""
    return next((src / n for n in TOKENIZER_FILES if (src / n).is_file()), None)


def _copy_tokenizer(src_file: Path, dst_file: Path) -> Any:
    """Copy a tokenizer to `dst_file`, with the special-token names HFTokenizer reads."""

    tokenizer = load_tokenizer(str(src_file))  # reads the HF files beside it for special ids
    paths.copy_file(src_file, dst_file)
    if src_file.suffix == ".json":
        if (src_file.parent / "special_tokens_map.json").is_file():
            paths.copy_file(
                src_file.parent / "special_tokens_map.json",
                dst_file.parent / "special_tokens_map.json",
            )
        template = src_file.parent / "tokenizer_config.json"
        _write_tokenizer_config(tokenizer, template, dst_file.parent)
    return tokenizer


def _token(tokenizer: Any, i: int) -> str:
    if hasattr(tokenizer, "id_to_token"):
        return tokenizer.id_to_token(i)

    proto = paths.as_path(tokenizer.path).read_bytes()  # the file may be in a bucket
    return spm.SentencePieceProcessor(model_proto=proto).IdToPiece(i)


def _write_tokenizer_config(tokenizer: Any, template: Path, dst: Path) -> None:
    """tokenizer_config.json naming every special token the tokenizer has an id for."""
    data = _read_json(template) if template.is_file() else {}
    if not data and tokenizer.path.endswith(".json"):
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    for role in ROLES:
        i = getattr(tokenizer, f"{role}_id")
        if i >= 0 and data.get(f"{role}_token") is None:
            data[f"{role}_token"] = _token(tokenizer, i)
    (dst / "tokenizer_config.json").write_text(json.dumps(data, indent=2) + "\n", "utf-8")


# ---------------------------------------------------------------------------- from-hf


def _run_config(hf: dict[str, Any], tokenizer_path: Path | None) -> RunConfig:
    model = model_config_from_hf(hf)
    data = DataConfig(
        tokenizer=str(paths.absolute(tokenizer_path)) if tokenizer_path else None,
        seq_len=min(model.max_seq_len, 1024),
    )
    cfg = resolve(RunConfig(model=model, data=data))
    validate(cfg)
    return cfg


def from_hf(
    src: str | Path, output: str | Path, dtype: str = "float32", tokenizer: str | None = None
) -> dict[str, Any]:
    """Convert a HF GPT-2/Llama/Mixtral directory into a jaxlm export `output`.

    The tokenizer is `tokenizer` if given, else the directory's tokenizer.json or
    tokenizer.model; it is copied so the output is self-contained.
    """

    _check_dtype(dtype)
    paths.check_reachable(src, "HF_DIR")
    src, output = paths.as_path(src, "HF_DIR"), paths.as_path(output, "--output")
    if not (src / "config.json").is_file():
        raise ConfigError(f"'{src}' holds no config.json; pass a Hugging Face model directory.")
    hf = _read_json(src / "config.json")
    tok_src = paths.as_path(tokenizer, "--tokenizer") if tokenizer else _tokenizer_file(src)
    if tok_src is None:
        raise ConfigError(
            f"'{src}' has no tokenizer.json or tokenizer.model; add the model's tokenizer files "
            f"there or pass --tokenizer FILE."
        )
    if not tok_src.is_file() or tok_src.suffix not in (".json", ".model"):
        raise ConfigError(
            f"--tokenizer '{tok_src}' is not a tokenizer.json or SentencePiece .model file."
        )
    tok_name = "tokenizer.json" if tok_src.suffix == ".json" else "tokenizer.model"
    cfg = _run_config(hf, output / tok_name)  # refuses unsupported models before any I/O
    weights = SafetensorsWeights(src)
    tmp = _new_output(output)

    def fill(tmp: Path) -> None:
        tokenizer = _copy_tokenizer(tok_src, tmp / tok_name)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"The tokenizer in '{src}' has {tokenizer.vocab_size} tokens but the model only "
                f"{cfg.model.vocab_size} embeddings; the two don't belong together."
            )
        _, abstract = abstract_params(cfg)
        params = params_from_hf(
            hf["model_type"],
            cfg.model,
            weights,
            abstract,
            lambda x, a: jax.device_put(x.astype(_np_dtype(dtype)), a.sharding),
        )
        with object_store.standard_checkpointer(tmp) as checkpointer:
            checkpointer.save(paths.absolute(tmp) / "params", params)
            checkpointer.wait_until_finished()
        (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        info = {
            "source": str(paths.absolute(src)),
            "step": 0,
            "dtype": dtype,
            "from_hf": hf["model_type"],
        }
        info["params"] = sum(int(x.size) for x in jax.tree.leaves(params))
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    _publish(tmp, output, fill)
    return {"output": str(output), "family": cfg.model.family, "dtype": dtype}


# ------------------------------------------------------------------------------ to-hf


class _Gathered:
    """A sharded parameter that becomes numpy (gathered from every host) when read."""

    def __init__(self, x: jax.Array) -> None:
        self.x = x

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = to_host(self.x)
        return out if dtype is None else out.astype(dtype)


class _ShardWriter:
    """Safetensors files of at most `max_bytes` each (one tensor may exceed it alone),
    named like transformers' own: model.safetensors, or model-0000i-of-0000n.safetensors
    with model.safetensors.index.json."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir, self.max_bytes = directory, max_bytes
        self.pending: dict[str, np.ndarray] = {}
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        if self.pending and sum(t.nbytes for t in self.pending.values()) + tensor.nbytes > (
            self.max_bytes
        ):
            self._flush()
        self.pending[name] = tensor
        self.total += tensor.nbytes

    def _flush(self) -> None:
        part = f"part-{len(self.files):05d}.safetensors"
        with paths.local_file_for_writing(self.dir / part) as local:  # put whole into a bucket
            save_file(self.pending, str(local), metadata={"format": "pt"})
        self.files.append((part, list(self.pending)))
        self.pending = {}

    def close(self) -> int:
        """Write what is pending and give the files their final names; returns their number."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            paths.move(self.dir / self.files[0][0], self.dir / "model.safetensors")
            return 1
        weight_map = {}
        for i, (part, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            paths.move(self.dir / part, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        text = json.dumps(index, indent=2) + "\n"
        (self.dir / "model.safetensors.index.json").write_text(text, encoding="utf-8")
        return n


def to_hf(
    path: str | Path,
    output: str | Path,
    dtype: str = "float32",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Write a run's or export's model as a transformers directory `output`.

    With several processes every one must call this (the tensors are gathered from all of
    them); process 0 writes the files.
    """

    output = paths.as_path(output, "--output")
    _check_dtype(dtype)
    if max_shard_bytes <= 0:
        raise ConfigError(f"--max-shard-gb must be positive, not {max_shard_bytes / 1024**3:g}.")
    _check_new(output)
    paths.check_reachable(path, "RUN_OR_EXPORT")
    cfg_path = paths.as_path(path, "RUN_OR_EXPORT") / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{path}' holds no config.yaml; pass a jaxlm run or export directory.")
    # Refuse a model HF has no class for before restoring (and gathering) any parameter.
    kind = hf_model_type(load_config(cfg_path).model)
    run = load_run(path)
    model = run.cfg.model
    primary = jax.process_index() == 0
    files = 0

    def fill(tmp: Path | None) -> None:
        nonlocal files
        params = run.params
        if getattr(model, "scan_layers", False):  # stacked blocks -> block_0 .. block_{L-1}
            params = unstack_blocks(params, model.n_layers)
        writer = _ShardWriter(tmp, max_shard_bytes) if tmp is not None else None
        for name, tensor in iter_params_to_hf(kind, model, jax.tree.map(_Gathered, params)):
            if writer is not None:
                writer.add(name, tensor.astype(_np_dtype(dtype)))
        if tmp is None:
            return
        files = writer.close()
        ids = {role: getattr(run.tokenizer, f"{role}_id") for role in ("bos", "eos", "pad")}
        tok = paths.as_path(run.tokenizer.path)
        paths.copy_file(
            tok, tmp / ("tokenizer.json" if tok.suffix == ".json" else "tokenizer.model")
        )
        template = tok.parent / "tokenizer_config.json"
        _write_tokenizer_config(run.tokenizer, template, tmp)
        if (tok.parent / "special_tokens_map.json").is_file():
            paths.copy_file(tok.parent / "special_tokens_map.json", tmp / "special_tokens_map.json")
        # config.json last: what transformers looks for first marks a complete directory.
        hf = hf_config_from_model(model, ids) | {"dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")

    if primary:
        _publish(_new_output(output), output, fill)
    else:
        fill(None)  # takes part in every gather; writes nothing
    return {"output": str(output), "model_type": kind, "dtype": dtype, "safetensors_files": files}
