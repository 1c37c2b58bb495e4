"""`butterfly init`, `init --add-host` and `keys show`: the files of a multi-host cluster."""

from __future__ import annotations

import ipaddress
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.cli.hosts import (
    InitOptions,
    add_host,
    check_configs,
    init_cluster,
    parse_hosts,
    public_key,
)
from butterfly.config import ConfigInvalid, dump_toml, load_config
from butterfly.net.tls import cert_node
from butterfly.protocol.keys import load_or_create_key
from butterfly.types.errors import ConfigError

HOSTS = ("10.1.0.1:9000", "10.1.0.2:9000", "gpu3.example:9000", "10.1.0.4:9100")


def san(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(i) for i in names.get_values_for_type(x509.IPAddress)]
    return names.get_values_for_type(x509.DNSName), ips


def signed_by(cert_path: Path, ca_path: Path) -> bool:
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def make(tmp_path: Path, tiny_model: Path, **kw: object) -> list[Path]:
    opts = InitOptions(hosts=HOSTS, model=str(tiny_model), **kw)  # type: ignore[arg-type]
    return init_cluster(opts, tmp_path / "out")


def test_each_host_directory_loads_with_its_key_and_certificate(
    tmp_path: Path, tiny_model: Path
) -> None:
    paths = make(tmp_path, tiny_model)
    out = tmp_path / "out"
    configs = [load_config([p]) for p in paths]
    keys = configs[0].cluster.public_keys
    for i, (path, cfg) in enumerate(zip(paths, configs, strict=True)):
        assert path == out / f"node-{i}" / "butterfly.toml"
        assert cfg.node.id == i and cfg.cluster.members == HOSTS
        assert cfg.cluster.public_keys == keys  # equal everywhere
        assert cfg.byzantine.f == 1  # the largest 4 hosts allow
        assert cfg.node.listen == f"0.0.0.0:{HOSTS[i].rsplit(':', 1)[1]}"
        # relative paths resolve into the host's own directory, wherever it is copied
        assert Path(cfg.node.data_dir) == path.parent
        assert load_or_create_key(path.parent / "node.key").public.hex() == keys[i]
        assert stat.S_IMODE((path.parent / "node.key").stat().st_mode) == 0o600
        tls = cfg.security.tls
        assert tls.enabled and Path(tls.cert).parent == path.parent / "tls"
        assert stat.S_IMODE(Path(tls.key).stat().st_mode) == 0o600
        assert signed_by(Path(tls.cert), out / "ca" / "ca.pem")
        cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
        dns, ips = san(cert)
        host = HOSTS[i].rsplit(":", 1)[0]
        assert dns[0] == f"node-{i}"  # the name peers check comes first
        assert host in (ips if host[0].isdigit() else dns)
        subject_alt = [("DNS", d) for d in dns] + [("IP Address", a) for a in ips]
        assert cert_node({"subjectAltName": tuple(subject_alt)}) == i
        listed = (path.parent / "public_keys.txt").read_text()
        assert f"{i} {HOSTS[i]} {keys[i]}" in listed
    # the CA key stays in ca/, and no node's TLS key is left there
    assert sorted(p.name for p in (out / "ca").iterdir()) == ["ca.key", "ca.pem"]


def test_init_refuses_what_could_not_run(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"n >= 3f\+1"):
        make(tmp_path, tiny_model, f=2)
    make(tmp_path, tiny_model, tls=False)
    with pytest.raises(ConfigError, match="already holds a cluster"):
        make(tmp_path, tiny_model)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_hosts("a:1,a:1")
    with pytest.raises(ConfigError, match="host:port"):
        parse_hosts("a:1,b")
    with pytest.raises(ConfigError, match="certificate name"):
        init_cluster(InitOptions(hosts=("node-1:9000",), model="m"), tmp_path / "other")


def test_add_host_writes_its_directory_and_the_change_for_everyone(
    tmp_path: Path, tiny_model: Path
) -> None:
    make(tmp_path, tiny_model)
    out = tmp_path / "out"
    before = load_config([out / "node-2" / "butterfly.toml"])
    added = add_host(out, "10.1.0.5:9000")
    assert added.config == out / "node-4" / "butterfly.toml"
    assert added.members == (*HOSTS, "10.1.0.5:9000")
    change = tomllib.loads(added.change)["cluster"]
    assert tuple(change["members"]) == added.members
    assert tuple(change["public_keys"]) == added.public_keys
    for i in range(5):  # every host's config now carries the change, and loads
        cfg = load_config([out / f"node-{i}" / "butterfly.toml"])
        assert cfg.cluster.members == added.members
        assert cfg.cluster.public_keys == added.public_keys
        assert cfg.node.id == i
    new = load_config([added.config])
    assert new.cluster.public_keys[:4] == before.cluster.public_keys
    assert new.cluster.public_keys[4] == public_key(added.config)[0]
    assert signed_by(Path(new.security.tls.cert), out / "ca" / "ca.pem")  # the same CA
    assert san(x509.load_pem_x509_certificate(Path(new.security.tls.cert).read_bytes())) == (
        ["node-4"],
        [str(ipaddress.ip_address("10.1.0.5"))],
    )
    with pytest.raises(ConfigError, match="already member 4"):
        add_host(out, "10.1.0.5:9000")
    with pytest.raises(ConfigError, match="no cluster"):
        add_host(tmp_path / "empty", "10.1.0.6:9000")
    shutil.rmtree(out / "node-4")  # a host's directory gone: nothing may be overwritten
    with pytest.raises(ConfigError, match="every host's directory"):
        add_host(out, "10.1.0.6:9000")
    assert not (out / "node-4").exists()


def test_add_host_reads_a_hand_edited_first_config_as_a_node_would(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Keys left to their defaults in node 0's file (a hand edit) were KeyErrors; a model
    path that is only on the hosts was refused."""
    make(tmp_path, tiny_model)
    out = tmp_path / "out"
    first = out / "node-0" / "butterfly.toml"
    doc = tomllib.loads(first.read_text())
    del doc["node"]["listen"], doc["cluster"]["id"]
    doc["model"]["path"] = str(tmp_path / "only-on-the-hosts")
    first.write_text(dump_toml(doc))
    added = add_host(out, "10.1.0.5:9000")
    new = load_config([added.config], on_this_machine=False)
    assert new.node.listen == f"{load_config([]).node.listen.rsplit(':', 1)[0]}:9000"
    cert = x509.load_pem_x509_certificate(Path(new.security.tls.cert).read_bytes())
    assert san(cert)[0] == ["node-4"] and signed_by(
        Path(new.security.tls.cert), out / "ca" / "ca.pem"
    )
    kept = tomllib.loads(first.read_text())
    assert "listen" not in kept["node"] and len(kept["cluster"]["members"]) == 5


def test_cli_init_add_host_and_keys_show(tmp_path: Path, tiny_model: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    hosts = ",".join(HOSTS)
    result = runner.invoke(
        app, ["init", "--hosts", hosts, "--model", str(tiny_model), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    cfg = load_config([out / "node-3" / "butterfly.toml"])
    shown = runner.invoke(app, ["keys", "show", "--config", str(out / "node-3" / "butterfly.toml")])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == cfg.cluster.public_keys[3]
    added = runner.invoke(app, ["init", "--add-host", "10.1.0.9:9000", "--out", str(out)])
    assert added.exit_code == 0, added.output
    change = tomllib.loads(added.stdout)["cluster"]
    assert change["members"][-1] == "10.1.0.9:9000" and len(change["public_keys"]) == 5
    refused = runner.invoke(app, ["init", "--out", str(tmp_path / "x"), "--hosts", "a:1"])
    assert refused.exit_code == 2 and "--model" in refused.output


def test_a_model_only_on_the_hosts_is_a_note_not_an_error(tmp_path: Path) -> None:
    """init may run on a laptop without the model; a real problem still stops it."""
    opts = InitOptions(hosts=HOSTS, model="/srv/nowhere/model")
    paths = init_cluster(opts, tmp_path / "out")
    notes = check_configs(paths)
    assert len(notes) == 4 and all("put the model there on that host" in n for n in notes)
    (paths[1].parent / "tls" / "node-1.pem").unlink()
    with pytest.raises(ConfigInvalid, match=r"security\.tls\.cert"):
        check_configs(paths)


def test_a_refused_init_leaves_nothing_behind_and_a_full_out_is_refused(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A setting the written configs fail on (an API port of 70000) exits 2 and takes
    back what it wrote, so the mended command runs (it found 'already holds a cluster');
    an --out holding anything else is refused before anything is written."""
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["init", "--hosts", ",".join(HOSTS), "--model", str(tiny_model), "--out", str(out)]
    bad = runner.invoke(app, [*args, "--api-port", "70000"])
    assert bad.exit_code == 2 and "api.port" in bad.output, bad.output
    assert not out.exists()
    good = runner.invoke(app, args)
    assert good.exit_code == 0, good.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    refused = runner.invoke(app, [*args[:-1], str(full)])
    assert refused.exit_code == 2 and "not an empty directory" in refused.output
    assert sorted(p.name for p in full.iterdir()) == ["notes.txt"]
