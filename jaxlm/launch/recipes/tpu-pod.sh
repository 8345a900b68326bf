#!/usr/bin/env bash
# jaxlm on a Cloud TPU VM pod slice: the same command on every worker (--worker=all). JAX
# reads each worker's rank and the coordinator from the TPU VM metadata, so no addresses
# are passed. Rendered by `jaxlm launch tpu`, which runs it; `--dry-run` prints it. The
# repository must be checked out and installed at {{remote_dir}} on every worker, and the
# workdir must be shared storage (e.g. a Filestore or GCS FUSE mount).
set -euo pipefail
REMOTE=$(cat <<'JAXLM_REMOTE'
set -euo pipefail
cat > {{config_path}} <<'JAXLM_CONFIG'
{{config_yaml}}
JAXLM_CONFIG
cd {{remote_dir}}
{{setup}}
{{train}}
JAXLM_REMOTE
)
gcloud compute tpus tpu-vm ssh {{tpu_name}} --zone={{zone}}{{project_flag}} --worker=all --command="$REMOTE" </dev/null
