//! Batch publishing to JetStream: every publish sent at once, the PubAcks
//! awaited together, one answer per event.

use watchtower::{ErrorKind, Event, PublishBatchExt, SubscribeOptions, Subscriber};
use watchtower_test_support::unique;

use crate::jetstream::next;
use crate::support::{local, numbered, stream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_window_is_stored_complete_and_in_order() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    // 500 events through a window of 100: the batch waits for its own
    // first acknowledgements.
    let mut sub = client
        .jetstream_subscriber(&name)
        .open(SubscribeOptions::new([format!("{name}.b")]).unwrap())
        .await
        .unwrap();
    let mut batches = client.jetstream_publisher().max_in_flight(100).batched();
    let events = numbered(&format!("{name}.b"), 500);
    let answers = batches.publish_batch(events.clone()).await.unwrap();
    assert_eq!(answers.len(), 500);
    for (i, (answer, event)) in answers.iter().zip(&events).enumerate() {
        let receipt = answer.as_ref().unwrap();
        assert_eq!(&*receipt.event_id, event.id());
        assert_eq!(receipt.sequence, Some(i as u64 + 1));
    }
    assert_eq!(batches.get_ref().in_flight(), 0);
    assert_eq!(client.stream_messages(&name).await.unwrap(), 500);

    // Delivered in the batch's order.
    for event in &events {
        let delivery = next(&mut sub).await;
        assert_eq!(delivery.event().map(Event::id), Some(event.id()));
        delivery.ack().await.unwrap();
    }
    drop(sub);
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_in_a_batch_fails_alone() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let mut batches = client.jetstream_publisher().batched();
    let mut events = numbered(&format!("{name}.b"), 20);
    // Larger than the server's max payload (1 MiB by default).
    let oversized = Event::new(format!("{name}.b"), serde_json::json!({"x": "x".repeat(2 << 20)}));
    events[3] = oversized;
    // A subject no stream captures.
    events[7] = Event::new(unique("nostream."), serde_json::json!({}));
    let answers = batches.publish_batch(events.clone()).await.unwrap();
    assert_eq!(answers.len(), 20);
    for (i, answer) in answers.iter().enumerate() {
        match i {
            3 | 7 => assert_eq!(answer.as_ref().unwrap_err().kind(), ErrorKind::Rejected, "{i}"),
            _ => assert_eq!(&*answer.as_ref().unwrap().event_id, events[i].id()),
        }
    }
    assert_eq!(client.stream_messages(&name).await.unwrap(), 18);
    client.delete_stream(&name).await.unwrap();
}
