"""The command line against the PVE API double on loopback: config forms,
listings (whole output, text and JSON) and the errors a user meets."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import planb_pvesync
from pve_double import PveDouble, write_fixture

HERE = Path(__file__).parent
FIXTURE = HERE / 'fixtures' / 'cluster.json'
EXPECTED = HERE / 'expected'
TOKEN = 'planb@pve!sync=8a1a3c52-1b1e-4d4e-9b2e-2f6c2b7d9e10'


@pytest.fixture(scope='module')
def pve():
    with PveDouble(FIXTURE) as double:
        yield double


@pytest.fixture
def rc(tmp_path, pve):
    """rc(key=value lines...) -> path of a ~/.proxmoxrc for cluster demo."""
    def write(*lines, api=None):
        path = tmp_path / 'proxmoxrc'
        api = api or 'https://planb@pve:planbpass@127.0.0.1:{}'.format(pve.port)
        path.write_text('\n'.join(['[pve:demo]', 'api=' + api, *lines, '']))
        path.chmod(0o600)
        return str(path)
    return write


def run(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    code = planb_pvesync.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pinned(pve):
    return 'fingerprint=' + pve.fingerprint


@pytest.mark.parametrize('command', ['list-pve-hosts', 'list-pve-filestores',
                                     'list-pve-guests', 'list-planb-filesets'])
@pytest.mark.parametrize('as_json', [False, True])
def test_listings_whole_output(capsys, rc, pve, monkeypatch, command, as_json):
    config = Path(rc(pinned(pve), 'ssh_user=planb'))
    config.replace(config.parent / '.proxmoxrc')    # the default: no -f in a command
    monkeypatch.setenv('HOME', str(config.parent))
    code, out, err = run(capsys, command, *(['--json'] if as_json else []))
    assert (code, err) == (0, '')
    expected = EXPECTED / '{}.{}'.format(command, 'json' if as_json else 'txt')
    if os.environ.get('PLANB_UPDATE_EXPECTED'):
        expected.write_text(out)
    assert out == expected.read_text()
    if as_json:
        json.loads(out)


def test_guest_filter_by_vmid_and_name(capsys, rc, pve):
    config = rc(pinned(pve))
    code, by_name, _ = run(capsys, '-f', config, 'list-pve-guests', '-g', 'ct-web')
    assert code == 0 and by_name.splitlines()[0] == 'demo/lxc/200/ct-web(on)'
    code, by_id, _ = run(capsys, '-f', config, '-g', '200', 'list-pve-guests')
    assert by_id == by_name


def test_unknown_and_ambiguous_guests(capsys, rc, pve, tmp_path):
    code, out, err = run(capsys, '-f', rc(pinned(pve)), 'list-pve-guests', '-g', 'nope')
    assert code == 2 and "no guest 'nope' in cluster demo" in err
    twin = json.loads(FIXTURE.read_text())
    twin['guests'].append(dict(twin['guests'][2], vmid=306, node='pve2'))
    fixture = tmp_path / 'twin.json'
    write_fixture(fixture, twin)
    with PveDouble(fixture) as other:
        config = rc('fingerprint=' + other.fingerprint,
                    api='https://planb@pve:planbpass@127.0.0.1:{}'.format(other.port))
        code, out, err = run(capsys, '-f', config, 'list-pve-guests', '-g', 'acme-wp')
    assert code == 2
    assert "guest name 'acme-wp' is ambiguous in cluster demo: 106 on pve1, 306 on pve2" in err


def test_api_call_count_is_fixed_plus_one_per_guest(capsys, rc, pve):
    pve.reset_calls()
    code, _, err = run(capsys, '-v', '-f', rc(pinned(pve)), 'list-pve-guests')
    configs = [c for c in pve.calls if c[1].endswith('/config')]
    assert code == 0 and len(configs) == 5     # the offline node's guest costs none
    assert len(pve.calls) == 4 + len(configs)  # login, resources, storage, status
    assert 'discovery: {} API calls'.format(len(pve.calls)) in err


@pytest.mark.parametrize('lines, api', [
    (['token=' + TOKEN], 'https://127.0.0.1:{port}'),
    (['user=planb@pve', 'password=planbpass'], 'https://127.0.0.1:{port}'),
    ([], 'https://planb@pve:planbpass@localhost:{port}'),
])
def test_login_forms(capsys, rc, pve, lines, api):
    config = rc(pinned(pve), *lines, api=api.format(port=pve.port))
    code, out, err = run(capsys, '-f', config, 'list-pve-hosts')
    assert (code, err) == (0, '') and out.startswith('demo/node/pve1\n')
    if lines and lines[0].startswith('token='):
        assert ('POST', '/access/ticket') not in pve.calls[-3:]


@pytest.mark.parametrize('tls', ['ca_file', 'verify_ssl=no'])
def test_tls_settings(capsys, rc, pve, tls):
    line = 'ca_file=' + pve.cert_file if tls == 'ca_file' else tls
    code, out, _ = run(capsys, '-f', rc(line), 'list-pve-hosts')
    assert code == 0 and out.startswith('demo/node/pve1\n')


def test_unpinned_self_signed_certificate_names_the_fingerprint(capsys, rc, pve):
    code, out, err = run(capsys, '-f', rc(), 'list-pve-hosts')
    assert code == 3 and out == ''
    assert 'its TLS certificate is not trusted ([SSL: CERTIFICATE_VERIFY_FAILED]' in err
    assert 'fingerprint=' + pve.fingerprint in err
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert err.count('(') == err.count(')') and '_ssl.c' not in err


def test_pinned_fingerprint_that_does_not_match(capsys, rc, pve):
    code, _, err = run(capsys, '-f', rc('fingerprint=' + ':'.join(['00'] * 32)),
                       'list-pve-hosts')
    assert code == 3 and 'fingerprint=' + pve.fingerprint in err


@pytest.mark.parametrize('lines, words', [
    (['user=planb@pve', 'password=wrong'], ['login as planb@pve refused (401', 'password']),
    (['token=planb@pve!sync=wrong'], ['login as planb@pve refused (401', 'token']),
])
def test_bad_credentials(capsys, rc, pve, lines, words):
    code, _, err = run(capsys, '-f', rc(pinned(pve), *lines,
                                        api='https://127.0.0.1:{}'.format(pve.port)),
                       'list-pve-hosts')
    assert code == 3 and len(err.splitlines()) == 1
    for word in words:
        assert word in err


@pytest.mark.parametrize('user, command, privilege', [
    ('nosys@pve:nosyspass', 'list-pve-hosts', 'Sys.Audit'),
])
def test_missing_privilege_is_named(capsys, rc, pve, user, command, privilege):
    api = 'https://{}@127.0.0.1:{}'.format(user, pve.port)
    code, _, err = run(capsys, '-f', rc(pinned(pve), api=api), command)
    assert code == 3 and 'grant it {}'.format(privilege) in err
    assert len(err.splitlines()) == 1


def test_guests_hidden_without_vm_audit(capsys, rc, pve):
    api = 'https://novm@pve:novmpass@127.0.0.1:{}'.format(pve.port)
    code, _, err = run(capsys, '-f', rc(pinned(pve), api=api), 'list-pve-guests', '-g', '106')
    assert code == 2 and 'lacks VM.Audit' in err


def test_unreachable_host(capsys, rc):
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]        # closed again: nothing listens there
    code, _, err = run(capsys, '-f', rc(api='https://u@pve:p@127.0.0.1:{}'.format(port)),
                       'list-pve-hosts')
    assert code == 3 and 'cannot connect' in err and 'check api= in [pve:demo]' in err


def test_time_out(capsys, rc):
    with socket.socket() as silent:         # accepts connections, never answers
        silent.bind(('127.0.0.1', 0))
        silent.listen(5)
        config = rc('timeout=1', 'verify_ssl=no',
                    api='https://u@pve:p@127.0.0.1:{}'.format(silent.getsockname()[1]))
        code, _, err = run(capsys, '-f', config, 'list-pve-hosts')
    assert code == 3 and 'no answer within 1 s' in err


def test_guest_that_vanishes_between_two_calls(capsys, rc, tmp_path):
    fixture = tmp_path / 'cluster.json'
    data = json.loads(FIXTURE.read_text())
    write_fixture(fixture, data)
    with PveDouble(fixture, latency=0.3) as slow:
        def delete_106_after_discovery():
            while ('GET', '/cluster/status') not in slow.calls:
                time.sleep(0.005)
            write_fixture(fixture, dict(data, guests=[g for g in data['guests']
                                                      if g['vmid'] != 106]))
        threading.Thread(target=delete_106_after_discovery, daemon=True).start()
        config = rc('fingerprint=' + slow.fingerprint,
                    api='https://planb@pve:planbpass@127.0.0.1:{}'.format(slow.port))
        code, _, err = run(capsys, '-f', config, 'list-pve-guests', '-g', '106')
    assert code == 3
    assert 'guest 106 (acme-wp) vanished from node pve1 between two API calls' in err


def test_origin_usage_and_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        planb_pvesync.main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'usage: planb-pvesync' in err and '{list-pve-hosts,' in err
    assert err.endswith('planb-pvesync: error: give a command (see planb-pvesync --help)\n')
    with pytest.raises(SystemExit) as exc:
        planb_pvesync.main(['--version'])
    assert exc.value.code == 0 and planb_pvesync.__version__ in capsys.readouterr().out
    for option in ('--config FILENAME', '--pve-cluster CLUSTERNAME',
                   '--pve-guest GUESTNAME', '--sync-zfs-root DEST_FILESYSTEM'):
        with pytest.raises(SystemExit):
            planb_pvesync.main(['-h'])
        assert option.split()[0] in capsys.readouterr().out


def test_config_errors_exit_2_with_one_line(capsys, tmp_path):
    path = tmp_path / 'rc'
    path.write_text('[pve:demo]\napi=https://planb@pve:PASS:cluster.example.com:443\n')
    code, _, err = run(capsys, '-f', str(path), 'list-pve-hosts')
    assert code == 2 and err.count('\n') == 1 and '[pve:demo]' in err


def test_sync_needs_guest_and_root(capsys, rc, pve):
    code, _, err = run(capsys, '-f', rc(pinned(pve)), 'sync-pve-guest', '-g', '106')
    assert code == 2 and '--sync-zfs-root' in err


@pytest.mark.parametrize('args, message', [
    (['sync-pve-guest', '--sync-zfs-root', 'tank/b'],
     'sync-pve-guest needs the guests to sync: -g VMID|NAME, --all, --pool POOL or --tag TAG'),
    (['sync-pve-guest', '--all', '--keep-source', '0'],
     "argument --keep-source: '0' is no count"),
    (['sync-pve-guest', '--all', '-j', '0'], "argument -j/--jobs: '0' is not a whole number"),
    (['status', '--sync-zfs-root', 'tank/b@x'], "--sync-zfs-root takes a dataset"),
])
def test_fleet_usage_errors_are_one_line(capsys, rc, pve, args, message):
    try:
        code, _, err = run(capsys, '-f', rc(pinned(pve)), *args)
    except SystemExit as exc:       # argparse's own
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and message in err and err.count('\n') == 1


@pytest.fixture
def odd_cluster(tmp_path):
    """The demo cluster plus a second acme-wp (306) and a guest whose only
    disk is not on ZFS (130)."""
    data = json.loads(FIXTURE.read_text())
    data['guests'] += [
        dict(data['guests'][2], vmid=306, node='pve2'),
        {'vmid': 130, 'type': 'qemu', 'node': 'pve1', 'status': 'stopped',
         'config': {'name': 'iso-only', 'sata0': 'local:130/vm-130-disk-0.qcow2,size=4M'}}]
    fixture = tmp_path / 'odd.json'
    write_fixture(fixture, data)
    with PveDouble(fixture) as double:
        yield double


def odd_rc(rc, double):
    return rc('fingerprint=' + double.fingerprint,
              api='https://planb@pve:planbpass@127.0.0.1:{}'.format(double.port))


def test_planb_filesets_name_twins_apart_and_mark_what_has_nothing(capsys, rc, odd_cluster):
    config = odd_rc(rc, odd_cluster)
    code, out, err = run(capsys, '-f', config, 'list-planb-filesets',
                         '-g', '106', '-g', '306', '-g', 'iso-only')
    assert (code, err) == (0, '')
    command = 'planb-pvesync -f {} -p demo planb-transport'.format(config)
    assert out.splitlines() == [
        'demo/acme-wp-106(vmid=106;3 volume(s);can_create_snapshot=yes;can_rotate_snapshot=no)',
        '  {} 106'.format(command),
        'demo/iso-only(vmid=130;nothing to back up (sata0: not ZFS))',
        'demo/acme-wp-306(vmid=306;3 volume(s);can_create_snapshot=yes;can_rotate_snapshot=no)',
        '  {} 306'.format(command)]
    code, out, _ = run(capsys, '-f', config, 'list-planb-filesets', '-g', 'iso-only', '--json')
    row, = json.loads(out)
    assert (row['volumes'], row['note']) == ([], 'nothing to back up (sata0: not ZFS)')


PLANB_ENV = {'planb_guid': '1d6f3c4e-5a7b-4c8d-9e0f-123456789abc',
             'planb_storage_name': 'tank/planb/demo-acme-wp',
             'planb_snapshot_target': 'planb-20261126T0130Z'}


@pytest.mark.parametrize('args, env, code, message', [
    (['planb-transport', '106'], {},
     2, 'planb-transport is the transport_command of a PlanB fileset, and PlanB sets '
        'planb_guid, planb_storage_name, planb_snapshot_target; not set here: planb_guid, '
        'planb_storage_name, planb_snapshot_target'),
    (['planb-transport', '106'], dict(PLANB_ENV, planb_snapshot_target='planb-20261126T013000Z'),
     2, "planb_snapshot_target='planb-20261126T013000Z' is not what PlanB sets"),
    (['planb-transport', '-g', '106', '106'], PLANB_ENV,
     2, '-g/--pve-guest is not an option of planb-transport'),
    (['planb-transport', '999'], PLANB_ENV, 2, 'no guest with vmid 999 in cluster demo'),
    (['planb-transport', '130'], PLANB_ENV,
     1, 'guest 130 (iso-only) has nothing to back up (sata0: not ZFS)'),
    (['planb-transport', '306', '--keep-destination', 'all:1d'], PLANB_ENV,
     2, 'unrecognized arguments: --keep-destination'),
    (['planb-transport', 'acme-wp'], PLANB_ENV, 2, "'acme-wp' is no vmid"),
])
def test_planb_transport_refuses_before_anything_changes(capsys, rc, odd_cluster, monkeypatch,
                                                         args, env, code, message):
    for key in PLANB_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        status, _, err = run(capsys, '-f', odd_rc(rc, odd_cluster), *args)
    except SystemExit as exc:       # argparse's own
        status, err = exc.code, capsys.readouterr().err
    assert status == code and message in err and err.count('\n') == 1


def test_commands_that_call_no_api_start_without_the_http_stack(tmp_path):
    """sync-filesystem and the listings of local backups never load requests,
    urllib3 or proxmoxer: they are a third of the start-up."""
    script = ('import sys, planb_pvesync\n'
              'code = planb_pvesync.main(sys.argv[1:])\n'
              'loaded = {"requests", "urllib3", "proxmoxer"} & set(sys.modules)\n'
              'print(code, sorted(loaded))\n')
    repo = Path(__file__).resolve().parent.parent
    for args in (['sync-filesystem', '--dry-run', 'nosuch/src', 'nosuch/dst'],
                 ['list-restore-points', '-p', 'demo', '-g', '1', '--sync-zfs-root', 'nosuch']):
        done = subprocess.run([sys.executable, '-c', script, *args], cwd=tmp_path,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))
        _, loaded = done.stdout.splitlines()[-1].split(' ', 1)
        assert loaded == '[]', (args, done.stdout, done.stderr)


def test_verify_ssl_no_warns_once_per_run(capsys, rc):
    config = rc('verify_ssl=no')
    code, out, err = run(capsys, '-f', config, 'list-pve-guests')
    assert code == 0 and out.startswith('demo/qemu/100/')
    assert err.count('\n') == 1 and err.startswith(
        'planb-pvesync: warning: [pve:demo] has verify_ssl=no: ')
    assert 'password' in err and 'planbpass' not in err


def hostile_cluster(tmp_path, change):
    data = json.loads(FIXTURE.read_text())
    change(data)
    fixture = tmp_path / 'hostile.json'
    write_fixture(fixture, data)
    return PveDouble(fixture)


def guest_config(data, vmid):
    return next(g for g in data['guests'] if g['vmid'] == vmid)['config']


@pytest.mark.parametrize('name', ['web\ndemo/qemu/999/evil(on)', '_restore', '../x', 'a/b',
                                  '-oProxyCommand=x', 'VM 107'])
def test_a_guest_name_pve_would_not_give_is_not_used(capsys, rc, tmp_path, name):
    with hostile_cluster(tmp_path, lambda d: guest_config(d, 106).update(name=name)) as pve:
        config = rc('fingerprint=' + pve.fingerprint,
                    api='https://planb@pve:planbpass@127.0.0.1:{}'.format(pve.port))
        code, out, err = run(capsys, '-f', config, 'list-pve-guests', '-g', '106')
        assert (code, err) == (0, '')
        assert out.splitlines() == [
            'demo/qemu/106/106(on)',
            '  (volumes unknown: its name {!r} is no name PVE gives (a DNS name), so it is '
            "not backed up; is that the cluster's API?)".format(name)]
        code, out, err = run(capsys, '-f', config, 'sync-pve-guest', '-g', '106',
                             '--sync-zfs-root', 'tank/nowhere', '-n')
    assert code != 0 and 'not backed up' in err and name not in out


@pytest.mark.parametrize('change, words', [
    (lambda d: d['nodes'][0].update(ip='10.99.1.1 -oProxyCommand=x'),
     "node 'pve1' the address '10.99.1.1 -oProxyCommand=x', which is no IP address"),
    (lambda d: d['storage'][1].update(storage='local zfs'),
     "storage 'local zfs', which is no name PVE gives"),
])
def test_an_api_that_answers_what_pve_never_gives_changes_nothing(capsys, rc, tmp_path,
                                                                  change, words):
    with hostile_cluster(tmp_path, change) as pve:
        config = rc('fingerprint=' + pve.fingerprint,
                    api='https://planb@pve:planbpass@127.0.0.1:{}'.format(pve.port))
        code, out, err = run(capsys, '-f', config, 'list-pve-guests')
    assert (code, out) == (3, '') and words in err and err.count('\n') == 1


@pytest.mark.parametrize('change, words', [
    (lambda d: guest_config(d, 106).update(scsi0='local-zfs:../../ROOT/pve-1,size=8M'),
     "scsi0 names the volume '../../ROOT/pve-1' on local-zfs, which is no name PVE gives"),
    (lambda d: d['storage'][1].update(pool='rpool/data\nrpool/ROOT'),
     "storage local-zfs has the pool 'rpool/data\\nrpool/ROOT', which is no ZFS dataset name"),
])
def test_a_volume_pve_would_not_name_so_is_not_backed_up(capsys, rc, tmp_path, change, words):
    with hostile_cluster(tmp_path, change) as pve:
        config = rc('fingerprint=' + pve.fingerprint,
                    api='https://planb@pve:planbpass@127.0.0.1:{}'.format(pve.port))
        code, out, err = run(capsys, '-f', config, 'list-pve-guests', '-g', '106')
    assert (code, err) == (0, '') and words in out and 'ROOT/pve' not in out.replace(words, '')
