#!/usr/bin/env bash
# Makes the certificates of the TLS identity tests in DIR (openssl; nothing is downloaded):
#   ca-cert.pem ca-key.pem          the CA the server trusts (serve --tls-ca)
#   server-cert.pem server-key.pem  the server's certificate (CN=localhost), signed by that CA
# and one directory per client in the layout libnbd's tls-certificates expects
# (ca-cert.pem, client-cert.pem, client-key.pem):
#   tenant-a/   /O=tenants/CN=tenant-a, signed by the CA
#   tenant-b/   /O=tenants/CN=tenant-b, signed by the CA
#   crafted/    one O attribute whose value is "tenants,CN=tenant-b", signed by the CA: joined
#               without escaping it reads exactly like tenant-b's subject in certificate order
#   crafted-cn/ one CN attribute whose value is "tenant-b,O=tenants", signed by the CA: the same
#               trick against joining in RFC 4514 order (most specific first)
#   wrong-ca/   /O=tenants/CN=tenant-b, signed by another CA the server does not trust
#   expired/    /O=tenants/CN=tenant-b, signed by the CA, valid only on 2020-01-01
#   no-cert/    the CA certificate only: the client presents no certificate
set -euo pipefail
dir=${1:?usage: make-test-certificates.sh DIR}
mkdir -p "$dir"
cd "$dir"
quiet() { "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; "$@"; exit 1; }; }

quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=vbd-test-ca -keyout ca-key.pem -out ca-cert.pem
quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=vbd-other-ca -keyout other-ca-key.pem -out other-ca-cert.pem

# sign NAME SUBJECT CA-PREFIX: a key and a certificate signed by CA-PREFIX-cert.pem.
sign() {
    quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$2" -keyout "$1-key.pem" -out "$1.csr"
    quiet openssl x509 -req -in "$1.csr" -CA "$3-cert.pem" -CAkey "$3-key.pem" -CAcreateserial -days 2 -out "$1-cert.pem"
}
client_dir() {   # client_dir NAME: the layout of libnbd's tls-certificates
    mkdir -p "$1"
    cp ca-cert.pem "$1/ca-cert.pem"
    mv "$1-cert.pem" "$1/client-cert.pem"
    mv "$1-key.pem" "$1/client-key.pem"
}

sign server /CN=localhost ca
sign tenant-a /O=tenants/CN=tenant-a ca && client_dir tenant-a
sign tenant-b /O=tenants/CN=tenant-b ca && client_dir tenant-b
sign crafted "/O=tenants,CN=tenant-b" ca && client_dir crafted
sign crafted-cn "/CN=tenant-b,O=tenants" ca && client_dir crafted-cn
sign wrong-ca /O=tenants/CN=tenant-b other-ca && client_dir wrong-ca

# An expired certificate needs explicit dates, which only `openssl ca` takes.
mkdir -p expired-db
: > expired-db/index.txt
echo 01 > expired-db/serial
cat > expired-ca.cnf <<'EOF'
[ca]
default_ca = expired
[expired]
database = expired-db/index.txt
new_certs_dir = expired-db
serial = expired-db/serial
default_md = sha256
policy = anything
preserve = yes
[anything]
organizationName = supplied
commonName = supplied
EOF
quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /O=tenants/CN=tenant-b -keyout expired-key.pem -out expired.csr
quiet openssl ca -batch -config expired-ca.cnf -cert ca-cert.pem -keyfile ca-key.pem -in expired.csr \
    -out expired-cert.pem -startdate 20200101000000Z -enddate 20200102000000Z -notext
client_dir expired

mkdir -p no-cert
cp ca-cert.pem no-cert/ca-cert.pem
