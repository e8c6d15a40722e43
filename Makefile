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

# planb-pvesync against syncoid and zfs-autobackup on the lab (prints its estimated time;
# about an hour on 2 cores); writes bench/results.rst, results.json and the picture
# bench/scale.png (matplotlib, for the bench only). See bench/bench.py.
bench: deps
	$(PYTHON) -m pip install -q -r bench/requirements.txt
	$(PYTHON) bench/bench.py

# Boot the VM lab (building its image if needed) and leave it running; prints how to log in.
lab: deps
	$(PYTHON) tests/lab/lab.py up

lab-down:
	$(PYTHON) tests/lab/lab.py down
