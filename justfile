# jobd tasks. Run `bash tools/setup.sh` once first; it installs `just` into .venv/bin.

set positional-arguments

venv := justfile_directory() / ".venv/bin"
python := venv / "python"

default:
    @{{venv}}/just --list

# install jobd and its development tools into .venv
install:
    bash tools/setup.sh

# regenerate the protobuf and purerpc code from proto/ (commit the result)
proto:
    {{python}} tools/gen_proto.py

# create development certificates in certs/ (kept if present; --force to replace), and
# register them as the client context `dev` (current if there is none), for any directory
certs *args:
    {{venv}}/jobd certs dev --dir certs "$@"
    {{venv}}/jobd-client context add dev --replace --server 127.0.0.1:9090 --ca "$PWD/certs/ca.pem" --cert "$PWD/certs/alice.pem" --key "$PWD/certs/alice.key"

# ruff, mypy and the import contracts
lint:
    {{venv}}/ruff check .
    {{venv}}/mypy jobd jobd_client tools
    {{venv}}/lint-imports

# run the test suite (needs root for the cgroup tests)
test *args:
    {{venv}}/pytest "$@"

# run the server as root on 127.0.0.1:9090 (metrics on 127.0.0.1:9091) with development
# certificates; `exec`, so that a signal to this recipe's process reaches jobd itself
serve *args: (certs)
    exec {{venv}}/jobd serve --listen 127.0.0.1:9090 --metrics-listen 127.0.0.1:9091 --cert certs/server.pem --key certs/server.key --client-ca certs/ca.pem --data-dir data "$@"

# benchmarks against the local limit and a grpcio peer (--quick: CI smoke run, < 3 min)
bench *args:
    {{python}} tools/bench.py "$@"

# the reliability suite at full size (10 GiB job, 1000-job rounds, 2000 fuzz cases per RPC)
soak *args:
    JOBD_SOAK=1 {{venv}}/pytest tests/reliability -s "$@"
