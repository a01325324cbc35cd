# The two commands of the README's quick start. Both install into .venv first (once).
.PHONY: demo test install clean

install:
	./scripts/install.sh

demo: install
	.venv/bin/swarm demo

test: install
	./scripts/test.sh

clean:
	rm -rf .venv build *.egg-info
