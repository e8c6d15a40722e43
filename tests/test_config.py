"""~/.proxmoxrc: text in, frozen records or a one-line ConfigError out."""
import os

import pytest

import planb_pvesync
from planb_pvesync import (
    ConfigError, SshSettings, UsageError, load_config, parse_config)

FINGERPRINT = ':'.join(['AB'] * 32)


def cluster(text, name='c'):
    return parse_config(text, 'rc').clusters[name]


def test_origin_example_with_indented_storage_sections():
    config = parse_config('''
[pve:MYCLUSTER]
api=https://planb@pve:PASS@cluster.example.com:443

  [storage:MYCLUSTER:mc10-5-pve-local-ssd]
  ssh=someuser@10.20.30.105
''', 'rc')
    c = config.clusters['MYCLUSTER']
    assert (c.user, c.password, c.host, c.port) == (
        'planb@pve', 'PASS', 'cluster.example.com', 443)
    storage = config.storage('MYCLUSTER', 'mc10-5-pve-local-ssd', 'anynode')
    assert storage.target == '10.20.30.105'
    assert storage.ssh.user == 'someuser'


def test_origin_readme_typo_is_explained():
    with pytest.raises(ConfigError) as exc:
        cluster('[pve:c]\napi=https://planb@pve:PASS:cluster.example.com:443\n')
    message = str(exc.value)
    assert 'rc: [pve:c]' in message
    assert 'https://planb@pve:PASSWORD@cluster.example.com:443' in message
    assert 'PASS:' not in message     # the secret is not echoed


def test_default_port_and_password_with_at_and_colon():
    c = cluster('[pve:c]\napi=https://root@pam:p@ss:w0rd@pve1\n')
    assert (c.user, c.password, c.host, c.port) == ('root@pam', 'p@ss:w0rd', 'pve1', 8006)


def test_separate_user_password_and_ipv6_host():
    c = cluster('[pve:c]\napi=https://[2001:db8::1]:8007\nuser=planb@pve\npassword=x\n')
    assert (c.host, c.port, c.user, c.password) == ('[2001:db8::1]', 8007, 'planb@pve', 'x')


def test_token():
    c = cluster('[pve:c]\napi=https://pve1\ntoken=planb@pve!sync=aa-bb=cc\n')
    assert (c.user, c.token_id, c.token_secret, c.password) == (
        'planb@pve', 'sync', 'aa-bb=cc', None)


@pytest.mark.parametrize('extra, field, value', [
    ('verify_ssl=no', 'verify_ssl', False),
    ('ca_file=/etc/pve-root-ca.pem', 'ca_file', '/etc/pve-root-ca.pem'),
    ('fingerprint=' + FINGERPRINT.lower(), 'fingerprints', (FINGERPRINT,)),
    ('fingerprint={0}, {1} {0}'.format(FINGERPRINT, FINGERPRINT.replace('A', 'B')),
     'fingerprints', (FINGERPRINT, FINGERPRINT.replace('A', 'B'), FINGERPRINT)),
    ('failover=pve2, 10.0.0.3:8007 [fd00::4]', 'failover',
     (('pve2', 8006), ('10.0.0.3', 8007), ('[fd00::4]', 8006))),
    ('timeout=30', 'timeout', 30),
])
def test_tls_and_timeout(extra, field, value):
    c = cluster('[pve:c]\napi=https://u@pve:p@h\n' + extra + '\n')
    assert getattr(c, field) == value


def test_ssh_settings_per_cluster_and_storage():
    config = parse_config('''
[pve:c]
api=https://u@pve:p@h
ssh_user=planb
ssh_port=2222
ssh_cipher=aes128-gcm@openssh.com
[storage:c:local-zfs@pve2]
ssh=root@10.0.0.2
ssh_key=/keys/pve2
ssh_options=-o Compression=no
''', 'rc')
    c = config.clusters['c']
    assert c.ssh == SshSettings(user='planb', port=2222, ciphers='aes128-gcm@openssh.com')
    per_node = config.storage('c', 'local-zfs', 'pve2')
    assert per_node.node == 'pve2' and per_node.target == '10.0.0.2'
    merged = c.ssh.merged(per_node.ssh)
    assert merged.argv('10.0.0.2') == [
        'ssh', '-p', '2222', '-i', '/keys/pve2', '-c', 'aes128-gcm@openssh.com',
        '-o', 'Compression=no', 'root@10.0.0.2']
    assert config.storage('c', 'local-zfs', 'pve1') is None


@pytest.mark.parametrize('text, words', [
    ('[pve:c]\napi=https://u@pve:p@h\nbogus=1\n', ["[pve:c]", "unknown key 'bogus'"]),
    ('[cluster:c]\napi=x\n', ['[cluster:c]', 'unknown section']),
    ('[pve:c]\napi=http://u@pve:p@h\n', ['[pve:c]', 'https://']),
    ('[pve:c]\napi=https://u:p@h\n', ['needs a realm']),
    ('[pve:c]\napi=https://h\n', ['no user']),
    ('[pve:c]\napi=https://u@pve@h\n', ['no password or token']),
    ('[pve:c]\napi=https://u@pve:p@h\ntoken=u@pve!t=s\n', ['both a password and a token']),
    ('[pve:c]\napi=https://h\ntoken=nonsense\n', ['USER@REALM!TOKENID=SECRET']),
    ('[pve:c]\napi=https://u@pve:p@h\nfingerprint=AB:CD\n', ['SHA-256']),
    ('[pve:c]\napi=https://u@pve:p@h\nverify_ssl=maybe\n', ['yes or no']),
    ('[pve:c]\napi=https://u@pve:p@h\nverify_ssl=no\nca_file=/x\n', ['choose one']),
    ('[pve:c]\napi=https://u@pve:p@h\n[pve:c]\napi=https://u@pve:p@h\n',
     ['line 3: a second [pve:c] section']),
    ('api=https://x\n', ['line 1 (api=https://x) comes before any section',
                         'starts with a section line, [pve:CLUSTER]']),
    ('[pve:c]\napi=https://u@pve:p@h\napi=https://u@pve:p@h2\n', ['line 3: [pve:c] has api= twice']),
    ('[pve:c]\napi=https://u@pve:p@h\nssh user planb\n',
     ['line 3 (ssh user planb) is no KEY=VALUE line']),
    ('[pve:c]\napi=https://u@pve:p@h:99999x\n', ['api= has a bad host']),
    ('[pve:c]\napi=https://u@pve:p@h\nfailover=pve2/x\n', ['failover= has a bad host']),
    ('[storage:x:local]\nssh=a@b\n', ["cluster 'x'"]),
    ('[pve:c]\napi=https://u@pve:p@h\n[storage:c:local]\n', ['missing key ssh']),
    ('[pve:c]\napi=https://u@pve:p@h\n[storage:c:local@]\nssh=a@b\n', ['STORAGE@NODE']),
])
def test_errors_name_file_section_and_fix(text, words):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, 'rc')
    message = str(exc.value)
    assert message.startswith('rc') and '\n' not in message
    for word in words:
        assert word in message


def test_cluster_choice():
    config = parse_config('[pve:a]\napi=https://u@pve:p@h\n', 'rc')
    assert config.cluster(None).name == 'a'
    with pytest.raises(UsageError, match='known clusters: a'):
        config.cluster('b')
    two = parse_config('[pve:a]\napi=https://u@pve:p@h\n[pve:b]\napi=https://u@pve:p@h\n', 'rc')
    with pytest.raises(UsageError, match='choose one with -p: a, b'):
        two.cluster(None)


def test_missing_file_points_to_the_man_page(tmp_path):
    with pytest.raises(ConfigError, match='cannot read config: No such file or directory; '
                       'write one as man planb-pvesync shows under CONFIGURATION'):
        load_config(str(tmp_path / 'nope'))


@pytest.mark.parametrize('mode', [0o644, 0o640, 0o604, 0o620])
def test_a_config_others_may_read_or_change_is_refused(tmp_path, mode):
    path = tmp_path / 'rc'
    path.write_text('[pve:c]\napi=https://u@pve:p@h\n')
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert str(exc.value) == (
        '{0}: users other than its owner may read or change it (mode {1:04o}), and it '
        "holds the API's password or token; nothing was done; run: chmod 600 {0}".format(
            path, mode))
    os.chmod(path, 0o600)
    assert load_config(str(path)).clusters['c'].password == 'p'


@pytest.mark.parametrize('url', ['http://planb@pve:SECRET@pve1', 'planb@pve:SECRET@pve1',
                                 'http://planb@pve:SE:CR@ET@pve1:8006',
                                 'ftp://planb@pve:a://SECRET@pve1'])
def test_no_message_shows_the_password(url):
    with pytest.raises(ConfigError) as exc:
        parse_config('[pve:c]\napi={}\n'.format(url), 'rc')
    assert 'must start with https://' in str(exc.value)
    assert 'SECRET' not in str(exc.value) and 'CR' not in str(exc.value)
    assert ':***@pve1' in str(exc.value)


@pytest.mark.parametrize('text, shown', [
    ('password=SECRET\n[pve:c]\n', 'line 1 (password=***) comes before any section'),
    ('api=https://planb@pve:SECRET@pve1\n', 'line 1 (api=https://planb@pve:***@pve1) comes'),
    ('[pve:c]\napi=https://u@pve:p@h\npassword SECRET\n', 'line 3 (password ***) is no KEY='),
    ('[pve:c]\napi=https://u@pve:p@h\ntoken SECRET\n', 'line 3 (token ***) is no KEY='),
])
def test_a_line_a_message_shows_shows_no_password(text, shown):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, 'rc')
    assert shown in str(exc.value) and 'SECRET' not in str(exc.value)
