"""What the tests share and are not tests themselves: fixtures (``fixtures_*.py``, loaded as
pytest plugins by ``tests/conftest.py``), the throwaway PostgreSQL server (``pg_server``), and the
labs and harnesses that start real servers on loopback (``registry_lab``, ``console_lab``,
``daemon_harness``, ``eir_harness``). Import them as ``support.<module>``: ``tests/`` is on
``sys.path`` while pytest runs."""
