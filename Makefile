# Build automation for b25-gateway. Every target is a thin wrapper around the command the README
# documents, so `make test` is exactly CI's test command (scripts/test.sh).
#
#   make build        debug build of the gateway and the simulator
#   make release      optimised build (target/release/b25-gateway)
#   make pgo          profile-guided build, what the image ships (target/pgo/b25-gateway)
#   make run          serve config/gateway.yaml (needs B25_JWT_SECRET; see .env.example)
#   make demo         the seven simulated services + the gateway + demo credentials
#   make check-config validate CONFIG (default config/gateway.yaml): every problem listed
#   make test         the test command: fmt, clippy, the whole suite, demo smoke, deploy checks
#   make fmt | lint   cargo fmt | cargo clippy --all-targets -D warnings
#   make bench        benchmark against nginx and HAProxy (bench/run.sh, ~15 min, writes RESULTS.md)
#   make bench-micro  criterion micro-benchmarks of the hot path
#   make docker       container image (needs Docker; deploy/Dockerfile)
#   make docker-run   run the image on :8080 (admin :9901 inside), config and secrets from .env
#   make docker-push  push the image to $(IMAGE)'s registry (docker login first)
#   make check-deploy the deployment files checked by real tools
#   make hash-key     a new API key and the SHA-256 for the config

CARGO  ?= cargo
CONFIG ?= config/gateway.yaml
IMAGE  ?= b25-gateway:latest

.PHONY: build release pgo run demo check-config test fmt lint bench bench-micro docker docker-run docker-push check-deploy hash-key clean

build:
	$(CARGO) build --locked -p b25-gateway -p b25-sim

release:
	$(CARGO) build --locked --release -p b25-gateway

pgo:
	scripts/build-pgo.sh

run:
	$(CARGO) run --locked -p b25-gateway -- run --config $(CONFIG)

demo:
	$(CARGO) run --locked -p b25-gateway -- demo --config $(CONFIG)

check-config:
	$(CARGO) run --locked -q -p b25-gateway -- check --config $(CONFIG)

test:
	bash scripts/test.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

bench:
	bash bench/run.sh

bench-micro:
	$(CARGO) bench --locked -p b25-gateway --bench hot_path

docker:
	docker build -f deploy/Dockerfile -t $(IMAGE) .

docker-run:
	docker run --rm -p 8080:8080 --env-file .env $(IMAGE)

docker-push:
	docker push $(IMAGE)

check-deploy:
	bash scripts/check-deploy.sh

hash-key:
	$(CARGO) run --locked -q -p b25-gateway -- hash-key --generate

clean:
	$(CARGO) clean
