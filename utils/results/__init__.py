"""What a run hands out: the HTML report with its MI maps, map figures, and exports to other tools (.npy +
parquet, LanceDB)."""
