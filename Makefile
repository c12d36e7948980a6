.PHONY: setup demo test chaos
setup:
	scripts/setup
demo:
	scripts/demo
test:
	scripts/test
chaos:
	scripts/chaos
