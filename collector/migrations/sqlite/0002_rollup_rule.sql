-- Rollups gain the rule that decided the events (the events' `rule`, '' when none, like
-- user_id), so the limits report — how often each rule limited whom, shadow hits included —
-- is answered from the rollups. key_hash covers the rule when it is not '', so rows folded
-- before this migration keep their hash and go on receiving events without a rule.
-- Rows folded before this migration (and events queued before it) have rule '': they were
-- not split by rule.

ALTER TABLE rollup_queue ADD COLUMN rule TEXT NOT NULL DEFAULT '';

ALTER TABLE rollups ADD COLUMN rule TEXT NOT NULL DEFAULT '';
