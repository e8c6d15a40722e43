PYTHON ?= python3

.PHONY: test lab lab-down

test:
	$(PYTHON) -m pytest -v tests

# Boot the VM lab (building its image if needed) and leave it running; prints how to log in.
lab:
	$(PYTHON) tests/lab/lab.py up

lab-down:
	$(PYTHON) tests/lab/lab.py down
