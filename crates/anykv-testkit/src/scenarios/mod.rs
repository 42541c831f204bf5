//! The scenarios, one module per area.

mod atomic;
mod conditional;
mod coordination;
mod crud;
mod keys;
mod listing;
mod liveness;
mod locks;
mod mirror;
mod namespace;
mod snapshot;
mod transfer;
mod ttl;
mod watch;

use crate::Scenario;

macro_rules! scenario {
    ($area:ident :: $name:ident) => {
        Scenario {
            area: stringify!($area),
            name: stringify!($name),
            run: |cx| Box::pin($area::$name(cx)),
        }
    };
}

pub(crate) fn all() -> Vec<Scenario> {
    vec![
        scenario!(crud::put_get_delete_exists),
        scenario!(crud::overwrite_changes_version),
        scenario!(crud::recreate_never_reuses_version),
        scenario!(crud::empty_value_is_a_key),
        scenario!(crud::binary_and_large_values),
        scenario!(crud::value_too_large),
        scenario!(crud::typed_json_helpers),
        scenario!(conditional::create_only_on_existing),
        scenario!(conditional::update_only_on_missing),
        scenario!(conditional::compare_and_swap),
        scenario!(conditional::compare_and_delete),
        scenario!(conditional::concurrent_cas_one_winner),
        scenario!(listing::list_is_directory_scoped_and_sorted),
        scenario!(listing::keys_one_level),
        scenario!(listing::delete_prefix),
        scenario!(listing::parents_are_not_keys),
        scenario!(listing::list_under_concurrent_writers),
        scenario!(keys::invalid_keys_rejected_everywhere),
        scenario!(namespace::namespaces_are_isolated),
        scenario!(ttl::ttl_expires_or_unsupported),
        scenario!(watch::watch_key_in_order_with_prev),
        scenario!(watch::watch_prefix_is_directory_scoped),
        scenario!(watch::replay_from_past_revision),
        scenario!(watch::start_after_skips_older),
        scenario!(watch::dropped_watches_release),
        scenario!(watch::closed_handle_ends_watch_with_error),
        scenario!(watch::delete_prefix_emits_deletes),
        scenario!(watch::many_watches_each_get_their_events),
        scenario!(snapshot::two_prefixes_at_one_revision),
        scenario!(snapshot::watch_after_snapshot_has_no_gap),
        scenario!(snapshot::compact_discards_history_only),
        scenario!(mirror::mirror_follows_every_change),
        scenario!(mirror::mirror_converges_under_writers),
        scenario!(mirror::typed_mirror_reports_undecodable_values),
        scenario!(coordination::ephemeral_keys_end_with_their_session),
        scenario!(coordination::dropped_session_removes_its_keys),
        scenario!(coordination::closed_handle_ends_its_sessions),
        scenario!(coordination::election_five_candidates),
        scenario!(coordination::long_campaign_keeps_its_lease),
        scenario!(locks::mutual_exclusion_between_tasks),
        scenario!(locks::fencing_tokens_increase),
        scenario!(locks::try_lock_and_holder),
        scenario!(locks::lost_after_release),
        scenario!(locks::dropped_guard_releases),
        scenario!(locks::wait_times_out),
        scenario!(locks::max_hold_releases),
        scenario!(atomic::commit_when_all_checks_hold),
        scenario!(atomic::nothing_written_when_a_check_fails),
        scenario!(atomic::limits_and_duplicates),
        scenario!(transfer::export_import_round_trip),
        scenario!(liveness::starts_not_alive_then_alive),
    ]
}
