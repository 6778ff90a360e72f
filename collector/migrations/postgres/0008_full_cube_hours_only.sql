-- The full cube (0) keeps minutes and hours only: its days and weeks were most of a fold's
-- writes and are summed from its hours when read (`rollup::Cube::has`). Rows folded before
-- this are no longer read.
DELETE FROM rollups WHERE cube = 0 AND granularity IN (2, 3);
