"""Build of egresscore's Cython extensions (the rest of the metadata is in pyproject.toml)."""

from __future__ import annotations

import os
import platform
import shlex

from Cython.Build import cythonize
from Cython.Compiler import Options
from setuptools import Extension, setup

if os.environ.get("EGRESSCORE_WERROR"):
    # A warning-free build is part of the test suite (make build sets this).
    Options.warning_errors = True

# The Cython core, one extension per component (see egresscore/core/*.pxd).
EXTENSION_MODULES = [
    "egresscore.core.inet",
    "egresscore.core.prefix_table",
    "egresscore.core.packet",
    "egresscore.core.snat_table",
    "egresscore.core.selector",
    "egresscore.core.classifier",
    "egresscore.core.nfqueue",
    "egresscore.core.kernel_conntrack",
    "egresscore.core.gateway",
    "egresscore.core.node",
]

# C libraries an extension links with (Debian: libnetfilter-queue-dev, libmnl-dev,
# libnetfilter-conntrack-dev).
LIBRARIES = {
    "egresscore.core.nfqueue": ["netfilter_queue", "mnl"],
    "egresscore.core.kernel_conntrack": ["netfilter_conntrack", "nfnetlink"],
    "egresscore.core.gateway": ["netfilter_queue", "mnl", "netfilter_conntrack", "nfnetlink"],
    "egresscore.core.node": ["netfilter_queue", "mnl"],
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_args() -> list[str]:
    args = ["-O3", "-Wall", "-Wno-unused-function"]
    # Lookups rank bitmaps with popcount; without the POPCNT instruction GCC calls a
    # library routine several times slower. Every x86-64 CPU since 2008 has it.
    if platform.machine() in ("x86_64", "AMD64") and "popcnt" in cpu_flags():
        args.append("-mpopcnt")
    if os.environ.get("EGRESSCORE_WERROR"):
        args.append("-Werror")
    args += shlex.split(os.environ.get("EGRESSCORE_CFLAGS", ""))
    return args


extensions = [
    Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        extra_compile_args=compile_args(),
        libraries=LIBRARIES.get(name, []),
    )
    for name in EXTENSION_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=bool(os.environ.get("EGRESSCORE_ANNOTATE")),
    ),
)
