"""Shared pytest setup. The `lab` fixture gives tests the three OpenZFS VMs of tests/lab (see tests/lab/lab.py)."""
import os
import shutil
from pathlib import Path

import pytest

from lab.cluster import setup_demo_cluster
from lab.lab import Lab

REPO_ROOT = Path(__file__).resolve().parent.parent
LAB_TOOLS = ('qemu-system-x86_64', 'qemu-img', 'debootstrap')


def pytest_configure(config):
    config.addinivalue_line('markers', 'lab: runs against the three qemu VMs of tests/lab (pve1, pve2, backup)')


def pytest_collection_modifyitems(items):
    for item in items:
        if 'lab' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope='session')
def lab(tmp_path_factory):
    """The booted VM lab (built if needed), with the tool installed; stopped at the end of the session.
    With PLANB_LAB_DIR set to the state directory of a lab that `make lab` left running, that
    lab is used (its pools made anew) and left running: quicker while working on lab tests."""
    missing = [tool for tool in LAB_TOOLS if shutil.which(tool) is None]
    if missing:
        reason = 'the VM lab needs ' + ', '.join(missing) + ' (see .ci/run for the packages)'
        if os.environ.get('CI') == 'true':
            pytest.fail(reason)
        pytest.skip(reason)
    running = os.environ.get('PLANB_LAB_DIR')
    if running:     # a lab of `make lab`, kept running: fresh pools, this tool
        vms = Lab(running, keep_running=True)
        vms.create_pools()
        vms.install_tool(REPO_ROOT)
        yield vms
        return
    vms = Lab(tmp_path_factory.mktemp('lab'))
    try:
        vms.start()
        vms.install_tool(REPO_ROOT)
        yield vms
    finally:
        vms.stop()


@pytest.fixture(scope='session')
def demo(lab):
    """The lab with the demo cluster of tests/lab/cluster.py on it, set up once."""
    setup_demo_cluster(lab)
    return lab
