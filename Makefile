.PHONY: run test setup check-compose
run:
	bash scripts/run.sh

test:
	bash scripts/test.sh

setup:
	bash scripts/setup.sh

check-compose:
	.venv/bin/python -c "import yaml,sys; yaml.safe_load(open('docker-compose.yml')); print('docker-compose.yml parses')"
