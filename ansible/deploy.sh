#!/usr/bin/env bash
# The pipeline's deploy step (Jenkinsfile, .github/workflows/ci.yml), after the
# quality gate on main: deploy.yml with this commit as the app version.
#   INVENTORY            the inventory file (a CI credential)
#   VAULT_PASSWORD_FILE  the vault password file (a CI credential)
# The play fails (and so the build) when the canary analysis rolls the canary back.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${INVENTORY:?set INVENTORY to the inventory file}"
: "${VAULT_PASSWORD_FILE:?set VAULT_PASSWORD_FILE to the vault password file}"
bash ansible/venv.sh
cd ansible
exec ../target/ansible-venv/bin/ansible-playbook -i "$INVENTORY" \
  --vault-password-file "$VAULT_PASSWORD_FILE" deploy.yml \
  -e "app_version=$(git rev-parse --short HEAD)"
