"""The API stays reachable: what is safe to repeat is tried again (urllib3's
Retry), and when a host does not answer the cluster's other nodes of
failover= take over; against PVE API doubles on loopback that drop
connections, stop answering or refuse them on demand."""
import re
from pathlib import Path

import pytest

import planb_pvesync
from planb_pvesync import PveApi, PveError, guest_freezer, parse_config, read_cluster
from pve_double import PveDouble

HERE = Path(__file__).parent
FIXTURE = HERE / 'fixtures' / 'cluster.json'
HOSTS = (HERE / 'expected' / 'list-pve-hosts.txt').read_text()
TOKEN = 'planb@pve!sync=8a1a3c52-1b1e-4d4e-9b2e-2f6c2b7d9e10'


@pytest.fixture
def node1(tmp_path):
    with PveDouble(FIXTURE, cert_dir=str(tmp_path / 'node1')) as double:
        yield double


@pytest.fixture
def node2(tmp_path):
    """Another node of the same cluster: its own certificate, its own tickets."""
    with PveDouble(FIXTURE, cert_dir=str(tmp_path / 'node2')) as double:
        yield double


@pytest.fixture
def no_backoff(monkeypatch):
    """Tries again at once, to keep these tests short; the tries are urllib3's."""
    monkeypatch.setattr(planb_pvesync, 'API_BACKOFF', 0)


def config_text(node, *lines, login='user=planb@pve\npassword=planbpass'):
    return '\n'.join(['[pve:demo]', 'api=https://127.0.0.1:{}'.format(node.port), login,
                      *lines, ''])


def rc(tmp_path, text):
    path = tmp_path / 'proxmoxrc'
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def run(capsys, *argv):
    code = planb_pvesync.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_dropped_connection_is_tried_again_and_said_with_v(capsys, tmp_path, node1):
    config = rc(tmp_path, config_text(node1, 'fingerprint=' + node1.fingerprint,
                                      login='token=' + TOKEN))
    node1.drop(2)
    code, out, err = run(capsys, '-f', config, '-v', 'list-pve-hosts')
    assert (code, out) == (0, HOSTS)
    assert err.splitlines() == [
        'planb-pvesync: (api) GET /api2/json/cluster/resources: Remote end closed connection '
        'without response; trying again {} ({} of 3)'.format(wait, n)
        for n, wait in ((1, 'at once'), (2, 'in 1 s'))]
    assert node1.calls == [('GET', '/cluster/resources')] * 3 + [
        ('GET', '/storage'), ('GET', '/cluster/status')]
    node1.drop(1)
    assert run(capsys, '-f', config, 'list-pve-hosts') == (0, HOSTS, '')


def test_tries_are_bounded(capsys, tmp_path, node1, no_backoff):
    config = rc(tmp_path, config_text(node1, 'fingerprint=' + node1.fingerprint))
    node1.drop(10)
    code, _, err = run(capsys, '-f', config, 'list-pve-hosts')
    assert code == 3 and len(err.splitlines()) == 1
    assert ('127.0.0.1:{}: cannot connect (Remote end closed connection without response); '
            'check api= in [pve:demo]'.format(node1.port)) in err
    assert node1.calls == [('POST', '/access/ticket')] * 4


def freezer(node, vmid=106):
    text = config_text(node, 'fingerprint=' + node.fingerprint)
    api = PveApi(parse_config(text).cluster(None))
    cluster = read_cluster(api, 'demo')
    guests = planb_pvesync.read_guest_volumes(
        api, cluster, [planb_pvesync.find_guest(cluster, str(vmid))])
    return guest_freezer(api, guests)


def agent_calls(node):
    return [path.rsplit('/', 1)[1] for _, path in node.calls if '/agent/' in path]


def test_a_thaw_whose_answer_is_lost_is_sent_again(node1):
    freeze = freezer(node1)
    with freeze('106'):
        assert node1.frozen == {106}
        node1.drop(1)
    assert node1.frozen == frozenset()
    assert agent_calls(node1) == ['fsfreeze-freeze', 'fsfreeze-thaw', 'fsfreeze-thaw']


def test_a_freeze_whose_answer_is_lost_is_not_sent_again_but_thawed(node1):
    freeze = freezer(node1)
    node1.drop(1)
    with pytest.raises(PveError, match='Remote end closed connection'):
        with freeze('106'):
            pass
    assert node1.frozen == frozenset()
    assert agent_calls(node1) == ['fsfreeze-freeze', 'fsfreeze-thaw']


def test_the_next_node_takes_over_when_the_api_host_refuses(capsys, tmp_path, node1, node2,
                                                            no_backoff):
    config = rc(tmp_path, config_text(
        node1, 'failover=127.0.0.1:{}'.format(node2.port),
        'fingerprint={} {}'.format(node2.fingerprint, node1.fingerprint)))
    assert run(capsys, '-f', config, 'list-pve-hosts') == (0, HOSTS, '')
    node1.stop()                    # pveproxy is down there
    code, out, err = run(capsys, '-f', config, 'list-pve-hosts')
    assert (code, out) == (0, HOSTS)
    assert err == ('planb-pvesync: warning: 127.0.0.1:{} does not answer ([Errno 111] '
                   'Connection refused); going on with 127.0.0.1:{} from failover=\n'.format(
                       node1.port, node2.port))
    assert node2.calls[0] == ('POST', '/access/ticket')      # a login of its own
    node2.stop()
    code, _, err = run(capsys, '-f', config, 'list-pve-hosts')
    assert code == 3
    assert err.splitlines()[-1] == (
        'planb-pvesync: error: 127.0.0.1:{1}: cannot connect ([Errno 111] Connection '
        'refused); check api= and failover= in [pve:demo]; tried before: 127.0.0.1:{0} '
        '([Errno 111] Connection refused)'.format(node1.port, node2.port))


def test_the_next_node_takes_over_when_the_api_host_does_not_answer(capsys, tmp_path, node1,
                                                                    node2, no_backoff):
    config = rc(tmp_path, config_text(
        node1, 'failover=127.0.0.1:{}'.format(node2.port), 'timeout=1', 'verify_ssl=no',
        login='token=' + TOKEN))
    node1.hang()
    code, out, err = run(capsys, '-f', config, '-v', 'list-pve-guests', '-g', '106')
    assert code == 0 and out.startswith('demo/qemu/106/acme-wp(on)\n')
    tries = [line for line in err.splitlines() if '(api) GET /api2/json/cluster/resources' in line]
    assert len(tries) == 3 and all('Read timed out' in line for line in tries)
    assert re.search(r'warning: 127\.0\.0\.1:\d+ does not answer \(.*Read timed out.*\); '
                     r'going on with 127\.0\.0\.1:{} from failover=$'.format(node2.port),
                     err, re.M)
    assert node1.calls == [] and ('GET', '/nodes/pve1/qemu/106/config') in node2.calls


def test_each_node_is_pinned_by_its_own_fingerprint(capsys, tmp_path, node1, node2,
                                                    no_backoff):
    config = rc(tmp_path, config_text(node1, 'failover=127.0.0.1:{}'.format(node2.port),
                                      'fingerprint=' + node1.fingerprint))
    node1.stop()
    code, _, err = run(capsys, '-f', config, 'list-pve-hosts')
    assert code == 3
    assert err.splitlines()[-1] == (
        'planb-pvesync: error: 127.0.0.1:{}: its TLS certificate is not trusted '
        '(Fingerprints did not match); if that is your cluster, pin it in [pve:demo]: '
        'fingerprint={} {}'.format(node2.port, node1.fingerprint, node2.fingerprint))
