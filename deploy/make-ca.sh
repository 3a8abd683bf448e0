#!/usr/bin/env bash
# Creates the mesh's root CA for a cluster: an ECDSA P-256 self-signed CA certificate and its
# key (PKCS#8), as ca.crt and ca.key in the directory given (created, mode 0700).
#
#   bash deploy/make-ca.sh ./ambit-ca
#   kubectl -n ambit-system create secret generic ambit-ca \
#     --from-file=./ambit-ca/ca.crt --from-file=./ambit-ca/ca.key
#
# Every node's agent issues its pods' certificates from this key: keep the only other copy
# offline (docs/install.md, "The CA"). An intermediate CA works too: pass the chain with the
# agent's ca-chain setting.
set -euo pipefail
out=${1:?usage: make-ca.sh <directory> [validity-days]}
days=${2:-3650}
umask 077
mkdir -p "$out"
chmod 700 "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -days "$days" -subj "/O=ambit/CN=ambit root CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
chmod 600 "$out/ca.key"
chmod 644 "$out/ca.crt"
echo "wrote $out/ca.crt and $out/ca.key"
