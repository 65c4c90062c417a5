"""Fixed English sentences for the MiniLM sentence-embedding model (models/pretrained.py).

PAIRS are paraphrases: the scored task is paraphrase retrieval (a sentence's nearest neighbour
among all the other sentences, by cosine of the mean-pooled embedding, should be its partner).
Topics repeat across pairs on purpose (two about cooking, two about trains, ...) and each pair has
a DISTRACTOR that reuses its words with another meaning, so the nearest wrong neighbour is close
and compression errors show. CALIBRATION sentences are
disjoint from the pairs and only used to calibrate quantizers / data-aware passes.
Written for this repo; no dataset download.
"""

from __future__ import annotations

PAIRS: list[tuple[str, str]] = [
    ("A man is playing a guitar on the stage.", "Someone performs a song with a guitar in front of an audience."),
    ("A woman is playing the violin in the park.", "A lady plays a violin outdoors among the trees."),
    ("The chef is slicing onions in the kitchen.", "In the kitchen a cook cuts onions into thin pieces."),
    ("She is baking bread for the whole family.", "She makes loaves of bread in the oven for her relatives."),
    ("The train to Boston was delayed by two hours.", "The Boston train arrived two hours late."),
    ("The subway was packed with commuters this morning.", "This morning the metro was crowded with people going to work."),
    ("The stock market fell sharply after the announcement.", "Share prices dropped steeply following the news."),
    ("The central bank raised interest rates again.", "Once more the central bank increased the cost of borrowing."),
    ("A dog is running across the snowy field.", "A puppy dashes over a field covered in snow."),
    ("The cat is sleeping on the windowsill.", "A cat naps on the ledge of the window."),
    ("The children are building a sandcastle on the beach.", "Kids make a castle out of sand by the sea."),
    ("Two boys are playing football in the street.", "A pair of young boys kick a soccer ball around on the road."),
    ("The laptop battery drains very quickly.", "My notebook computer runs out of charge fast."),
    ("The software update fixed the login bug.", "After the patch, the problem with signing in was gone."),
    ("It is going to rain heavily tomorrow.", "A downpour is expected tomorrow."),
    ("The summer heat wave broke temperature records.", "Record high temperatures were set during the hot spell this summer."),
    ("The museum opens at nine in the morning.", "Doors of the museum open at 9 am."),
    ("The library will be closed on Sunday.", "On Sunday the library is not open."),
    ("He forgot his umbrella at the restaurant.", "He left his umbrella behind at the diner."),
    ("She lost her keys somewhere in the office.", "Her keys went missing at work."),
    ("The doctor prescribed antibiotics for the infection.", "The physician gave him antibiotics to treat the infection."),
    ("Regular exercise improves heart health.", "Working out often is good for your heart."),
    ("The company hired fifty new engineers this year.", "This year the firm recruited fifty more engineers."),
    ("The factory will shut down next month.", "Next month the plant is going to close."),
    ("The students are preparing for their final exams.", "The pupils are studying for the end-of-year tests."),
    ("The teacher explained the theorem with a simple drawing.", "Using a simple sketch, the instructor made the theorem clear."),
    ("The plane landed safely despite the storm.", "Even with the storm, the aircraft touched down without trouble."),
    ("Our flight was cancelled because of fog.", "Fog caused the airline to cancel our flight."),
    ("The river flooded the village overnight.", "During the night the village was flooded by the river."),
    ("A fire destroyed the old warehouse.", "The old storage building burned down."),
    ("The team won the championship in overtime.", "They took the title after extra time."),
    ("The runner broke the world record in the marathon.", "A new marathon world record was set by the athlete."),
    ("Please turn off the lights when you leave.", "Switch the lights off on your way out, please."),
    ("Can you send me the report by Friday?", "Could you email the report to me before the weekend?"),
    ("The price of coffee has doubled.", "Coffee now costs twice as much as before."),
    ("Fresh vegetables are sold at the market every Saturday.", "Every Saturday the market sells fresh produce."),
    ("The bridge is closed for repairs.", "Repair work has shut the bridge."),
    ("Traffic on the highway is moving slowly.", "Cars crawl along the motorway."),
    ("The scientist published a paper on climate change.", "A researcher released a study about global warming."),
    ("The telescope captured images of a distant galaxy.", "Pictures of a faraway galaxy were taken by the telescope."),
]

DISTRACTORS: list[str] = [  # one per pair, same words as its first sentence, another meaning
    "A man is tuning a guitar in the repair shop.",
    "A woman is selling violins in the park.",
    "The chef is buying onions at the market.",
    "She is eating bread with the whole family.",
    "The train to Boston left exactly on time.",
    "The subway was empty late this evening.",
    "The stock market rose sharply after the announcement.",
    "The central bank cut interest rates again.",
    "A dog is sleeping in the snowy field.",
    "The cat is chasing a bird off the windowsill.",
    "The children are cleaning plastic off the beach.",
    "Two boys are watching football on television.",
    "The laptop battery lasts all day.",
    "The software update introduced a new login bug.",
    "It rained heavily yesterday.",
    "The winter cold snap broke temperature records.",
    "The museum closes at nine in the evening.",
    "The library will be open late on Sunday.",
    "He forgot the name of the restaurant.",
    "She found her keys somewhere in the office.",
    "The doctor refused to prescribe antibiotics for the cold.",
    "Lack of exercise harms heart health.",
    "The company fired fifty engineers this year.",
    "The factory will reopen next month.",
    "The teachers are grading the final exams.",
    "The teacher could not explain the theorem.",
    "The plane was grounded because of the storm.",
    "Our flight left early despite the fog.",
    "The river dried up near the village.",
    "A fire drill was held in the old warehouse.",
    "The team lost the championship in overtime.",
    "The runner dropped out of the marathon.",
    "Please turn on the lights when you arrive.",
    "Can you read the report I sent on Friday?",
    "The price of coffee has fallen by half.",
    "Frozen vegetables are sold at the supermarket every day.",
    "The bridge reopened after the repairs.",
    "Traffic on the highway is moving fast.",
    "The scientist denied that climate change is happening.",
    "The telescope was too weak to see the distant galaxy.",
]

CALIBRATION: list[str] = [
    "The committee will meet again in April.",
    "He repaired the bicycle with a borrowed wrench.",
    "A small boat drifted toward the harbor.",
    "The recipe calls for two cups of flour.",
    "They painted the fence bright blue.",
    "The concert tickets sold out in minutes.",
    "Our neighbors adopted a kitten last week.",
    "The printer on the third floor is jammed.",
    "Mountains surround the quiet lake.",
    "The election results will be announced tonight.",
    "She translated the letter from French.",
    "The old clock in the hall stopped at noon.",
    "A new hospital is being built downtown.",
    "The garden is full of tomatoes this year.",
    "He answered every question in the interview.",
    "The network outage lasted three hours.",
    "Wind turbines line the coast.",
    "The bakery on the corner sells croissants.",
    "Please sign the form at the bottom.",
    "The orchestra rehearsed for the festival.",
    "A thunderstorm knocked out the power.",
    "The novel was translated into twenty languages.",
    "They hiked to the top of the hill before sunset.",
    "The engine makes a strange noise when it is cold.",
]


def scored() -> tuple[list[str], list[int]]:
    """The scored pool: the pairs flattened (2i, 2i+1), then the distractors; each sentence's partner
    index (-1 for a distractor, which is a candidate neighbour but not a query)."""
    sentences = [s for pair in PAIRS for s in pair] + DISTRACTORS
    partners = [i ^ 1 for i in range(2 * len(PAIRS))] + [-1] * len(DISTRACTORS)
    return sentences, partners
