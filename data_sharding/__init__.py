"""Raw MIMIC ingestion (readers, cohort, labels, EHR), the synthetic cohort and WebDataset shards."""
