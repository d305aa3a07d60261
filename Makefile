# Familiar shortcuts; the README's two commands are the way in.
.PHONY: services-up test quickstart bench lint example-%

services-up:
	scripts/services-up

test:
	scripts/test

quickstart:
	cargo run --example quickstart

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench:
	scripts/bench

# make example-nats_pubsub, example-redis_streams, ...
example-%: services-up
	cargo run --example $*
