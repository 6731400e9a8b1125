"""The sample upstream that ``keygate demo`` fronts; also the test-suite's real upstream."""
