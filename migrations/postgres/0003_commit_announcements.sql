-- Commits are announced by the store that made them (one NOTIFY on `pcf_events` for all the
-- commits made while the previous announcement was on its way), not by a trigger on every
-- append: a NOTIFY in each appending transaction serialised their commits on the
-- notification queue and woke every listener once per append.
DROP TRIGGER IF EXISTS events_notify ON events;
DROP FUNCTION IF EXISTS pcf_notify_events();
