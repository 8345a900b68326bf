"""Orbax checkpoints on object stores: gs:// natively, s3:// through tensorstore's s3 driver.

Orbax (0.12.x) writes array data through tensorstore and builds the kvstore spec itself; it
knows `gs://` (tensorstore's gcs driver) and local files, but turns `s3://bucket/key` into a
local file path. Tensorstore has an `s3` kvstore driver (also under OCDBT), so `enable_s3`
teaches Orbax's spec builder that URL, reading the endpoint from `AWS_ENDPOINT_URL` as boto
does. This touches two private functions of Orbax, so it is applied only to the versions it
was written against and checked by the object-store tests; other versions get a ConfigError
saying which Orbax to install (upstream support for s3:// is google/orbax pull request 2739).

Object stores have no atomic rename of a directory, so on both schemes Orbax's commit-file
mode is used: a step directory counts only once `commit_success.txt` is in it.
"""

from __future__ import annotations

import functools
import os

import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity, gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from jaxlm.errors import ConfigError
from jaxlm.paths import scheme

COMMIT_FILE = "commit_success.txt"
_TESTED = ("0.11.", "0.12.")  # the Orbax versions whose spec builder this adapts


def temporary_path_class(directory: str) -> type | None:
    """The Orbax atomicity mode for a checkpoint directory (None: Orbax's default)."""
    return atomicity.CommitFileTemporaryPath if scheme(directory) else None


def is_committed(step_dir) -> bool:
    """True when an object-store step directory holds its commit file."""
    return (step_dir / COMMIT_FILE).exists()


@functools.cache
def enable_s3() -> None:
    """Let Orbax write and read s3:// checkpoints (idempotent)."""
    if not ocp.__version__.startswith(_TESTED):
        raise ConfigError(
            f"s3:// checkpoints are supported with orbax-checkpoint 0.11 and 0.12, and this "
            f"is {ocp.__version__}; install orbax-checkpoint==0.12.8 or use a gs:// or local "
            f"workdir."
        )
    normalize = tensorstore_utils._normalize_path
    use_gcs = tensorstore_utils._use_gcs_driver
    gcs_spec = gcs_utils.get_kvstore_for_gcs

    def _normalize_path(path: str) -> str:
        if path.startswith("s3://"):
            return "s3://" + normalize(path[len("s3://") :])
        return normalize(path)

    def _use_remote_driver(directory: str) -> bool:
        return directory.startswith("s3://") or use_gcs(directory)

    def _kvstore_spec(path: str):
        if path.startswith("s3://"):
            return s3_kvstore_spec(path)
        return gcs_spec(path)

    tensorstore_utils._normalize_path = _normalize_path
    tensorstore_utils._use_gcs_driver = _use_remote_driver
    gcs_utils.get_kvstore_for_gcs = _kvstore_spec


def s3_kvstore_spec(url: str) -> dict:
    """Tensorstore's s3 kvstore spec for `s3://bucket/key`, honouring AWS_ENDPOINT_URL."""
    bucket, _, key = url[len("s3://") :].partition("/")
    spec: dict = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # else the SDK's default chain (profile, role)
        spec["aws_credentials"] = {"type": "environment"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def prepare(directory) -> None:
    """Make Orbax ready to write or read checkpoints under `directory` (any scheme)."""
    if scheme(directory) == "s3":
        enable_s3()


def standard_checkpointer(directory) -> ocp.StandardCheckpointer:
    """Orbax's one-tree checkpointer, set up for `directory`'s storage."""
    prepare(directory)
    return ocp.StandardCheckpointer(temporary_path_class=temporary_path_class(str(directory)))
