PYTHON ?= python3

.PHONY: deps test demo bench lab lab-down

# Packages the tests and the lab need (Debian 12, as root); a no-op when present.
deps:
	tests/lab/install-deps

test: deps
	$(PYTHON) -m pytest -v tests

# Boot the lab and show the tool backing up a guest of the demo cluster.
demo: deps
	$(PYTHON) tests/lab/demo.py

# planb-pvesync against syncoid and zfs-autobackup on the lab (under 30 minutes on 2 cores);
# prints a table and writes it to bench/results.rst. See bench/bench.py.
bench: deps
	$(PYTHON) bench/bench.py

# Boot the VM lab (building its image if needed) and leave it running; prints how to log in.
lab: deps
	$(PYTHON) tests/lab/lab.py up

lab-down:
	$(PYTHON) tests/lab/lab.py down
