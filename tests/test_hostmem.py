import os
import subprocess
import sys

import pytest

from deltal_jax import hostmem


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbled\n", None),
    ],
)
def test_thp_mode_reads_the_bracketed_mode(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hostmem.thp_mode(str(path)) == mode


def test_thp_mode_of_a_missing_file_is_none(tmp_path):
    assert hostmem.thp_mode(str(tmp_path / "absent")) is None


def test_environment_adds_the_tunable_in_madvise_mode_only():
    env = hostmem.huge_page_environment({"PATH": "/bin"}, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    for mode in ("always", "never", None):
        assert hostmem.huge_page_environment({"PATH": "/bin"}, mode) is None


def test_environment_keeps_other_tunables_and_respects_an_existing_setting():
    env = hostmem.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    opted_out = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert hostmem.huge_page_environment(opted_out, "madvise") is None


def test_use_huge_pages_reexecutes_the_command_once_with_its_arguments():
    """The child prints its tunables and arguments after use_huge_pages(): the same
    arguments, the tunable set exactly when this kernel's mode is madvise, and the code
    before the call run twice only when the process was re-executed."""
    code = (
        "import os, sys\n"
        "print('start', flush=True)\n"
        "from deltal_jax import hostmem\n"
        "hostmem.use_huge_pages()\n"
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if hostmem.thp_mode() == "madvise":
        assert lines == ["start", "start", "glibc.malloc.hugetlb=1 ['a', '--b=1']"]
    else:
        assert lines == ["start", "None ['a', '--b=1']"]
