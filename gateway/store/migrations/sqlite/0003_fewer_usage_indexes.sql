-- Every index on usage_records is paid on each of the many inserts, and reports by owner or route
-- read the `at` range anyway (usage_records_at_idx): these two cost the writes more than they saved
-- the reports.

DROP INDEX IF EXISTS usage_records_owner_at_idx;
DROP INDEX IF EXISTS usage_records_route_at_idx;
