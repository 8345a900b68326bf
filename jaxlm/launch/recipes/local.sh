#!/usr/bin/env bash
# jaxlm, several processes on one machine: {{nodes}} copies of `jaxlm train` joined through a
# coordinator on 127.0.0.1:{{port}}. This exercises the multi-host code path on a laptop
# (with fake CPU devices) or splits one box. Rendered and run by `jaxlm launch local`;
# `--dry-run` prints it. Words in double braces are filled in by jaxlm/launch/render.py.
set -uo pipefail
{{make_workdir}}
cat > {{config_path}} <<'JAXLM_CONFIG'
{{config_yaml}}
JAXLM_CONFIG
{{device_env}}
{{setup}}
pids=()
for ((i = 0; i < {{nodes}}; i++)); do
  {{train}} --coordinator 127.0.0.1:{{port}} --num-processes {{nodes}} --process-id "$i" </dev/null &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  # A process that fails leaves its peers waiting in a collective: stop them all at once,
  # and exit with the first failure's status.
  wait -n || { rc=$?; [[ $status == 0 ]] && status=$rc; kill "${pids[@]}" 2>/dev/null; }
done
exit "$status"
