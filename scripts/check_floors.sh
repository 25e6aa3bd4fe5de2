#!/usr/bin/env bash
# Install jaxdist's declared lower bounds (the ">=" floors of pyproject.toml, pinned with "==")
# in a fresh virtual environment, then train with a checkpoint and resume, on 2 fake CPU
# devices: `bash scripts/check_floors.sh [FOLDER]` (default: a new temporary folder).
# Needs the package index; takes a few minutes. Exit status 0 means the floors are true.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-$(mktemp -d)}
python=${PYTHON:-python3}

floors=$("$python" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(re.sub(r">=", "==", d) for d in deps))
PY
)
echo "floors: $floors"
"$python" -m venv "$folder/venv"
pip="$folder/venv/bin/pip"
"$pip" install -q $floors
# With its dependencies, as a notebook installs it: a jax already at the floor stays.
"$pip" install -q -e . --config-settings editable_mode=compat
"$folder/venv/bin/pip" list 2>/dev/null | grep -Ei "^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy) "
for pinned in $floors; do
  case "$pinned" in jax==*|jaxlib==*)
    name=${pinned%%==*}; want=${pinned#*==}
    have=$("$folder/venv/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))")
    test "$have" = "$want" || { echo "pip replaced $name $want by $have"; exit 1; } ;;
  esac
done

run() { (cd "$folder" && "$folder/venv/bin/python" -m jaxdist.run "$@" --cpu-devices 2); }
for experiment in "linear_regression parallel.backend=shard_map" digits_cnn; do
  workdir="$folder/${experiment%% *}"
  run $experiment --workdir "$workdir" train.steps=20 train.batch_size=64 \
      train.log_every=10 train.checkpoint_every=10 train.eval_every=0
  resumed=$(run $experiment --workdir "$workdir" train.steps=30 train.batch_size=64 \
      train.log_every=10 train.checkpoint_every=10 train.eval_every=0)
  echo "$resumed"
  grep -q "resumed from" <<<"$resumed"
  test "$(grep -c '"split": "train"' "$workdir/metrics.jsonl")" -eq 3
done
echo "floors OK: $floors"
