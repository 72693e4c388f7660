#!/usr/bin/env bash
# The post-deploy script of every environment here (envs/<env>.post-deploy.sh are links to this one file).
# Snakemake runs it once, inside the freshly created environment, after creating it (--sdm conda). It installs
# mammoseg itself, editable, from the checkout: the working directory (the repository root, where the workflow
# is run from by default), or $MAMMOSEG_SRC when the workflow runs elsewhere (e.g. --directory /scratch/run).
# --no-deps: the libraries are pinned in the environment file; pip must not upgrade them.
set -euo pipefail
src="${MAMMOSEG_SRC:-$PWD}"
if ! grep -qs '^name = "mammoseg"' "$src/pyproject.toml"; then
    echo "mammoseg post-deploy: $src is not a mammoseg checkout (no pyproject.toml naming mammoseg);" \
         "run snakemake from the repository root or set MAMMOSEG_SRC=/path/to/mammoseg" >&2
    exit 1
fi
python -m pip install --quiet --no-deps --no-build-isolation --editable "$src"
mammoseg --help >/dev/null
