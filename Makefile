# Convenience targets; each installs what is missing first (.ci/bootstrap, deploy/build-image.sh).
.PHONY: demo test bench env lint image
demo:
	bash .ci/bootstrap demo
test:
	bash .ci/bootstrap test
bench:
	bash .ci/bootstrap bench $(NAME)
env:
	bash .ci/bootstrap env
lint:
	.venv/bin/ruff check . && .venv/bin/mypy && .venv/bin/lint-imports --no-cache && bash .ci/deadcode
image:
	bash deploy/build-image.sh
