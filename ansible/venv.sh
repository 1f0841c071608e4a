#!/usr/bin/env bash
# Makes target/ansible-venv with the pinned Ansible this project is tested with
# (ansible-core, the amazon.aws collection inside `ansible`, ansible-lint, boto3 for
# provision.yml). Quick when it is there already. Used by ./test, Jenkins and GitHub.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/ansible-venv
if [ -x "$venv/bin/ansible-playbook" ] && [ -x "$venv/bin/ansible-lint" ]; then
  exit 0
fi
echo "venv.sh: installing ansible, ansible-lint, boto3 (PyPI) into $venv"
mkdir -p target
python3 -m venv "$venv"
"$venv/bin/pip" install -q 'ansible==11.13.0' 'ansible-core==2.18.19' 'ansible-lint==26.10.1' \
  'boto3==1.44.8'
