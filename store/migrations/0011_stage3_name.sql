-- Stage 3 has one name everywhere: the analysis kind and the pipeline stage once called 'fm' are 'stage3'.
-- (The FM and probe fits keep their table, fm_models.)
UPDATE analyses SET kind = 'stage3' WHERE kind = 'fm';
UPDATE pipeline_stages SET stage = 'stage3' WHERE stage = 'fm';
