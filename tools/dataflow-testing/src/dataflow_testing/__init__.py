"""Test support shared by the packages' suites: real services on loopback, free ports."""
