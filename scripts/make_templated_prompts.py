"""Add the templated prompts of the ``rm`` and ``ppo`` splits to the embedded prompt set.

Usage (from the repository root)::

    python scripts/make_templated_prompts.py           # rewrite rm.jsonl and ppo.jsonl
    python scripts/make_templated_prompts.py --check   # exit 1 if the files are out of date

Each split file holds a hand-written core (``"source": "hand"``) followed by templated
records (``"source": "template"``). This script keeps the hand-written records exactly as they
are, drops the old templated ones and appends a fresh set built from task templates and slot
fillers (topics, audiences, formats, constraints), each with the checks its wording states
(check kinds: docs/dataset_format.md). It is deterministic and idempotent: the random
generator is seeded by the split name, so the same hand-written records give the same file.

The two splits draw from disjoint halves of every filler pool, and a prompt whose normalised
text already occurs (in the split or in another split's hand-written records) is skipped, so
the splits stay disjoint as the BRIEF asks (separate prompt sets for SFT, RM and PPO).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from labkit.labelers import normalise

PROMPT_DIR = Path(__file__).resolve().parents[1] / "labkit" / "resources" / "prompts"
SPLITS = ("rm", "ppo")

# ----------------------------------------------------------------------------- filler pools
# Every pool is split in two halves (even items for rm, odd items for ppo), see `share`.

TOPICS = [
    "a fox crossing a frozen river", "the first day of spring in a mountain village",
    "an old typewriter found in an attic", "a street musician playing in the rain",
    "a kite stuck in a tall oak tree", "a night market by the harbor",
    "a grandmother's handwritten recipe book", "a train journey through the desert",
    "a lost red mitten", "a robot learning to paint", "a city park at dawn",
    "a snowstorm in April", "a bakery at four in the morning", "a whale singing in the deep ocean",
    "a sunflower field in August", "a forgotten birthday", "a bicycle ride along the coast",
    "an astronaut looking back at Earth", "a paper boat sailing down a gutter",
    "a squirrel hiding acorns for winter", "the last day of summer camp",
    "a thunderstorm over the prairie", "a rooftop vegetable garden", "a clock tower that stopped",
    "an owl living in an old barn", "a lantern festival on a river",
    "a fishing boat coming home at dusk", "a cat watching birds through a window",
    "a hot-air balloon drifting over a valley", "a beekeeper opening a hive",
    "moving into a new apartment", "a chess game in the park", "a village summer fair",
    "a penguin colony in a blizzard", "a marathon runner's last mile",
    "a night shift at a small hospital", "the smell of rain on hot pavement",
    "a ferry crossing on a foggy morning", "an abandoned amusement park", "a tiny island lighthouse",
]

FORMS = [  # (form, a word limit that suits it)
    ("short poem", 50), ("very short story", 120), ("diary entry", 100), ("postcard message", 60),
    ("song verse", 50), ("short prose sketch", 70), ("scene for a children's book", 90),
    ("short blog post", 90),
]

INCLUDE_PAIRS = [("quiet", "golden"), ("window", "morning"), ("silver", "promise"),
                 ("shadow", "laughter"), ("bridge", "whisper"), ("lantern", "river"),
                 ("ticket", "home"), ("feather", "storm")]
EXCLUDE_PAIRS = [("very", "really"), ("beautiful", "nice"), ("suddenly", "amazing"),
                 ("good", "bad"), ("big", "small"), ("happy", "sad")]
OPENINGS = ["Nobody expected", "It was the quietest", "Every morning", "Long ago",
            "On the last day", "No one remembers", "At first", "Somewhere far away"]
ENDINGS = ["And that was enough.", "Tomorrow we try again.", "The rest is history.",
           "Nothing was the same after that.", "And then it was morning.", "Home at last."]

ROLE_TOPICS = [  # user-based generation: (who I am, what the message is about)
    ("I run a neighborhood bakery", "our new rye bread"),
    ("I coach a girls' basketball team", "next Saturday's tournament"),
    ("I manage a community garden", "the spring planting day"),
    ("I volunteer at an animal shelter", "our adoption weekend"),
    ("I teach evening pottery classes for adults", "the start of the new term"),
    ("I run a small bike rental shop by the lake", "our new tandem bikes"),
    ("I organize a monthly board game night", "this month's game night"),
    ("I'm the secretary of a chess club", "the club's winter championship"),
    ("I own a tiny bookshop", "a visit from a local author"),
    ("I run a dog daycare", "our new puppy playgroup"),
    ("I'm a swimming instructor", "summer lessons for beginners"),
    ("I lead a community choir", "our winter concert"),
    ("I manage a coworking space", "our new quiet room"),
    ("I run a farm stand", "the first strawberries of the season"),
    ("I'm a school librarian", "the book swap next Friday"),
    ("I run a repair cafe", "our next free repair session"),
    ("I coordinate a beach cleanup group", "the cleanup on Sunday morning"),
    ("I'm a piano teacher", "the spring recital"),
    ("I manage a small climbing gym", "our new beginner routes"),
    ("I run a food bank", "our holiday food drive"),
]
MESSAGES = ["an announcement", "a short email", "a social media post", "a flyer",
            "a newsletter item", "a text message to our members"]
GREETINGS = ["Hello friends", "Big news", "Mark your calendars", "Hi everyone"]
SIGNOFFS = ["See you there!", "Thank you!", "We can't wait to see you.", "All are welcome."]

TAGLINE_ITEMS = ["a folding kayak", "a smart plant pot", "a silent alarm clock",
                 "a glow-in-the-dark dog collar", "a pocket-sized projector",
                 "a self-heating lunch box", "a bamboo toothbrush", "a solar garden lamp",
                 "a collapsible water bottle", "a weighted blanket"]
REMINDER_EVENTS = ["a dentist appointment on Tuesday at 4", "the library book due on Friday",
                   "a team lunch on Wednesday at noon", "a piano lesson on Saturday morning",
                   "the recycling pickup on Thursday", "a parent-teacher meeting on Monday",
                   "the gym class on Sunday at 10", "a haircut on Friday at 5"]

CONCEPTS = [  # open QA: things to explain
    "why bread dough rises", "how a compass finds north", "why ice is slippery",
    "how ocean tides work", "why cats usually land on their feet",
    "how a bicycle stays upright when it moves", "why the night sky is dark",
    "how a microwave oven heats food", "why we get goosebumps", "how rainbows form",
    "how a smoke detector works", "why metal feels colder than wood",
    "how plants drink water", "why some birds migrate", "how a thermos keeps drinks hot",
    "why the sea looks blue",
]
AUDIENCES = ["a five-year-old", "a curious teenager", "a busy adult", "a grandparent"]
USER_QUESTIONS = [  # open QA, user-based: (situation, question)
    ("I'm a first-time dog owner", "How often should I walk a young dog?"),
    ("I just started running", "How many days a week should I rest?"),
    ("I'm growing tomatoes on my balcony", "How often should I water them in summer?"),
    ("I'm about to paint my bedroom", "Do I really need to use a primer?"),
    ("I bought my first cast-iron pan", "How do I clean it without ruining it?"),
    ("I'm learning to bake bread", "Why did my loaf come out dense?"),
    ("I work at a desk all day", "How can I avoid back pain?"),
    ("I'm taking a long flight next week", "How can I reduce jet lag?"),
]

IDEA_THINGS = [  # brainstorming
    "a ten-year-old's birthday party", "a zero-waste picnic", "a school fundraiser",
    "a rainy weekend at home", "an office holiday party", "a family game night",
    "a road trip with teenagers", "a low-budget wedding", "a neighborhood block party",
    "a retirement gift for a gardener", "a first date at a museum", "a backyard campout",
]
LIST_THINGS = [  # brainstorming: (plural noun phrase)
    "uses for leftover rice", "ways to save water at home", "conversation starters for a dinner party",
    "ways to make a commute more fun", "gifts that cost nothing", "ways to stay cool without air conditioning",
    "snacks for a long hike", "habits for a calmer morning", "ways to use an old t-shirt",
    "questions to ask a new roommate",
]
NAME_THINGS = [
    "a goldfish", "a food truck selling soup", "a book club for sci-fi fans", "a robot vacuum",
    "a bakery that sells only pies", "a hiking blog", "a family sailboat", "a podcast about maps",
]
ROLE_GOALS = [  # user-based brainstorming: (who I am, the goal)
    ("I run a small cafe near a university", "attracting students during exam weeks"),
    ("I manage a public library branch", "getting more teenagers to visit"),
    ("I'm a scout leader", "a badge activity about the weather"),
    ("I run a yarn shop", "a fun event for beginners"),
    ("I organize a neighborhood watch group", "getting more neighbors involved"),
    ("I teach high school history", "making the Middle Ages more engaging"),
    ("I run a small hotel in the mountains", "things guests can do on rainy days"),
    ("I coach a table tennis club", "keeping young players motivated over summer"),
    ("I manage a retirement home", "weekly activities that residents will enjoy"),
    ("I run a vegetarian restaurant", "new dishes for a winter menu"),
]
SHOP_KINDS = ["a shop that sells only socks", "a bakery for dogs", "a bicycle cafe",
              "a store for board games", "a shop that repairs umbrellas", "a plant nursery for apartments",
              "a tea bar for kids", "a second-hand camera shop"]
CHAT_NEWS = [
    "just adopted a kitten", "passed my swimming test", "finished knitting my first scarf",
    "got promoted to team lead", "planted my first apple tree", "ran my first 10K race",
    "learned to ride a bike at 35", "baked bread from scratch for the first time",
]

INFORMAL = [
    "gonna be late, traffic is nuts", "can't make it tmrw, sorry", "the printer's broken again, ugh",
    "thx for the help, u rock", "need those numbers by friday, ok?", "meeting moved, check ur email",
    "lunch was awesome, let's do it again", "wifi's down, can't send the file",
]
COMMA_SENTENCES = [
    "If it rains tomorrow, we will meet indoors, bring snacks, and play cards.",
    "Before you leave, please turn off the lights, lock the door, and close the windows.",
    "The museum, which opened last year, is free on Sundays, Mondays, and holidays.",
    "After lunch, the children painted, sang, and played outside.",
    "My aunt, a retired pilot, loves gardening, chess, and long walks.",
    "Yes, the shop is open, but the cafe inside is closed today.",
]
LONG_SENTENCES = [
    "Because of the fact that the road was blocked by snow, the delivery driver was not able to reach our house.",
    "In my personal opinion, I think that the new park is a really very good addition to our neighborhood.",
    "At this point in time, we are currently in the process of reviewing all of the applications we received.",
    "The reason why the train was late is because there was a problem with the signals near the station.",
    "It is absolutely essential and very important that everyone arrives on time for the safety briefing.",
    "We would like to take this opportunity to thank each and every one of you for your kind donations.",
]
FEW_SHOT_REWRITES = [  # (instruction, checks, examples (rm: even, ppo: odd), queries)
    ("Turn each statement into a question, in one sentence.", ["ns1"],
     [("The store opens at nine.", "Does the store open at nine?"), ("The cat is asleep.", "Is the cat asleep?"),
      ("She has a brother.", "Does she have a brother?"), ("You can swim.", "Can you swim?")],
     ["The bus stops here.", "They live near the river.", "He likes green tea.",
      "The museum is closed today.", "You finished the report.", "The soup is too salty."]),
    ("Rewrite each sentence in the future tense, in one sentence.", ["ns1"],
     [("I walk the dog.", "I will walk the dog."), ("She bakes a cake.", "She will bake a cake."),
      ("We paint the fence.", "We will paint the fence."), ("They watch the game.", "They will watch the game.")],
     ["She visits her cousins.", "They play football after school.", "He cooks dinner.",
      "The band plays at the fair.", "I read the newspaper.", "We plant tulips."]),
    ("Shorten each sentence to at most 8 words.", ["mw8"],
     [("I am writing to let you know that the meeting is cancelled.", "The meeting is cancelled."),
      ("I am just writing to ask whether you have had a chance to read my email.", "Have you read my email?"),
      ("We wanted to say thank you so much for all of your help.", "Thank you so much for your help."),
      ("We would like to let all of you know that the pool is now open.", "The pool is now open."),
      ("Please remember that you need to bring your own lunch tomorrow.", "Please bring your own lunch tomorrow."),
      ("Please make sure that you remember to water the plants every day.", "Please water the plants daily.")],
     ["I just wanted to remind everyone that the office will be closed on Monday.",
      "We are very happy to tell you that your order has now been shipped.",
      "Could you please let me know if you are able to come to the party?",
      "It has come to our attention that several library books are overdue.",
      "We kindly ask that all visitors sign in at the front desk when they arrive.",
      "I wanted to let you know that I will be working from home on Friday."]),
    ("Rewrite each sentence in lowercase with no commas.", ["lc", "nc"],
     [("Yes, I Love It.", "yes i love it."), ("No, Thank You.", "no thank you."),
      ("Paris, France, Is Lovely.", "paris france is lovely."), ("Well, Good Morning.", "well good morning.")],
     ["Hello, Dear Friends, Welcome Back.", "Well, That Was Fun.", "Tea, Coffee, Or Juice?",
      "Sadly, The Show Is Over.", "Oslo, Norway, Is Cold In Winter.", "Okay, Let's Begin."]),
    ("Make each sentence sound more enthusiastic, in one sentence ending with an exclamation mark.",
     ["ns1", "ew!"],
     [("The food was fine.", "The food was absolutely delicious!"), ("The party was okay.", "The party was fantastic!"),
      ("The trip was okay.", "The trip was wonderful!"), ("The book was fine.", "The book was amazing!")],
     ["The movie was alright.", "The new office is decent.", "Your drawing is not bad.",
      "The concert was fine.", "The weather today is acceptable.", "The hotel was okay."]),
]

NOTES = [  # summarization passages: short notices and updates
    "The community pool will open two weeks late this summer because the filters need to be replaced. Season passes will be extended by two weeks at no cost. Swimming lessons will begin on the new opening day.",
    "Starting next month, the city will collect food scraps every Tuesday in green bins. Residents can pick up a free bin at the town hall. Meat and bones are allowed, but plastic bags are not.",
    "Our annual book fair raised 3,200 dollars for the school library. Parents volunteered more than 100 hours. The money will buy new picture books and two reading chairs.",
    "The hiking trail to Eagle Point is closed after a rockslide damaged the upper section. Rangers expect repairs to take about a month. The lower loop remains open to walkers.",
    "The bakery on Pine Street is changing its hours. It will now open at 6 a.m. instead of 7, and close at 3 p.m. on weekdays. Weekend hours stay the same.",
    "A new study followed 2,000 adults for ten years and found that people who walked daily slept better. The effect was strongest for those who walked in the morning. The researchers say more work is needed.",
    "The youth orchestra will perform at the town square on Saturday evening. Entry is free, but donations support new instruments. In case of rain, the concert moves to the school gym.",
    "Our office is moving to the fourth floor next week. Please pack your desks by Thursday evening. Movers will handle all boxes on Friday, and the new space opens on Monday.",
    "The museum's dinosaur hall reopened after a year of renovation. It now has a full skeleton of a young triceratops and a hands-on fossil lab for children. Tickets can be booked online.",
    "Heavy rain is expected across the region from Wednesday to Friday. Residents near the river are asked to move cars to higher ground. Schools will stay open unless flooding starts.",
    "The farmers' market is adding a second day. From June, it will run on Wednesday afternoons as well as Saturday mornings. Twelve new stalls will sell cheese, flowers and bread.",
    "Volunteers planted 400 trees along the old railway path last weekend. The city provided the saplings and tools. Another planting day is planned for the autumn.",
    "The science club's robot won second place at the regional contest. The team spent four months building it. They now hope to raise money to travel to the national final.",
    "From next Monday, the number 12 bus will no longer stop at Market Street because of road works. Riders should use the stop on Bridge Road instead. The change will last about six weeks.",
]
SUBJECT_LINE_NOTES = [
    "The parking lot will be repainted on Saturday, so please park on the street.",
    "Our team won the regional quiz night and the trophy is now in the lobby.",
    "The water will be turned off on Tuesday from 9 to 11 for pipe repairs.",
    "Free flu shots are available in room 3 every morning this week.",
    "The kitchen fridge will be emptied on Friday afternoon, so take your food home.",
    "The elevator is out of service until Thursday, so please use the stairs.",
    "Lost and found items will be donated to charity at the end of the month.",
    "The fire alarm will be tested on Wednesday at 10, so do not be alarmed.",
]
REVIEWS = [  # (review, label)
    ("The zipper broke after one week.", "negative"), ("Comfortable, warm, and it looks great.", "positive"),
    ("The blender is loud and leaks at the base.", "negative"), ("My kids use this lamp every night and love it.", "positive"),
    ("Arrived scratched and the instructions were missing.", "negative"), ("Easily the best umbrella I have owned.", "positive"),
    ("The charger stopped working in two days.", "negative"), ("Great value and the battery lasts all week.", "positive"),
    ("The chair wobbles no matter how I tighten it.", "negative"), ("Soft sheets that stay cool all night.", "positive"),
]
QUESTION_TOPICS = [  # (question, label among cooking / travel / money)
    ("How long should I boil an egg for a runny yolk?", "cooking"), ("Which documents do I need for a visa?", "travel"),
    ("How can I build an emergency fund?", "money"), ("What spices go well with roasted carrots?", "cooking"),
    ("Is it cheaper to fly on a Tuesday?", "travel"), ("Should I pay off debt or save first?", "money"),
    ("How do I keep rice from sticking?", "cooking"), ("What should I pack for a week in Iceland?", "travel"),
    ("How much of my salary should I save?", "money"), ("How do I make a sauce thicker?", "cooking"),
]
ANIMALS = [  # (animal, class among bird / mammal / reptile / fish)
    ("crocodile", "reptile"), ("bat", "mammal"), ("ostrich", "bird"), ("tuna", "fish"),
    ("tortoise", "reptile"), ("whale", "mammal"), ("parrot", "bird"), ("shark", "fish"),
    ("iguana", "reptile"), ("hedgehog", "mammal"), ("flamingo", "bird"), ("trout", "fish"),
]
EITHER_OR = [  # (item, option a, option b)
    ("gold", "metal", "gas"), ("a violin", "string instrument", "wind instrument"),
    ("Mars", "planet", "star"), ("a tulip", "flower", "tree"), ("oxygen", "gas", "liquid"),
    ("a trumpet", "brass instrument", "string instrument"), ("granite", "rock", "metal"),
    ("the Moon", "planet", "moon"), ("an oak", "tree", "shrub"), ("Spanish", "language", "currency"),
]
TICKETS = [  # (message, team among billing / technical / shipping)
    ("I was charged twice for the same order.", "billing"), ("The app crashes when I open my profile.", "technical"),
    ("My parcel has been stuck in transit for ten days.", "shipping"), ("Why is there a fee on my invoice?", "billing"),
    ("I can't log in after resetting my password.", "technical"), ("The box arrived at the wrong address.", "shipping"),
    ("Please refund my cancelled subscription.", "billing"), ("The website shows an error at checkout.", "technical"),
]

PLACE_NAMES = ["Juniper", "Harbor Lane", "Oakridge", "Willow Creek", "Bluebell", "Stonegate",
               "Redwood", "Lakeside", "Elmwood", "Foxglove", "Cedar Hill", "Marigold"]
PLACE_KINDS = ["bakery", "library", "swimming pool", "museum", "bike shop", "cafe", "garden center", "bookshop"]
STREETS = ["Mill Road", "Station Street", "Orchard Lane", "Canal Street", "Church Road",
           "Hill Avenue", "Market Square", "Park Lane"]
LANDMARKS = ["post office", "old fountain", "train station", "town hall", "fire station",
             "big oak tree", "river bridge", "bus depot"]
TIMES = ["7:30 a.m.", "8 a.m.", "9:15 a.m.", "10 a.m.", "6:45 a.m.", "11 a.m."]
PEOPLE = ["Amara", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jana",
          "Kofi", "Lucia", "Mateo", "Nadia", "Omar", "Petra", "Quinn", "Rosa", "Sami", "Tove",
          "Umar", "Vera", "Wes", "Yara"]
JOBS = ["carpenter", "nurse", "pilot", "librarian", "baker", "engineer", "gardener", "teacher"]
TOWNS = ["Alderley", "Brookfield", "Carrow", "Dunmore", "Easton", "Fairhaven", "Glenby", "Holloway"]
HOBBIES = ["sailing", "pottery", "chess", "beekeeping", "archery", "birdwatching", "rowing", "cycling"]
YEARS = ["1931", "1938", "1942", "1947", "1950", "1953", "1956", "1958"]  # born then, retired by now
EVENT_KINDS = ["kite festival", "jazz night", "craft fair", "charity run", "poetry evening", "food market"]
MONTHS = ["March", "April", "May", "June", "September", "October"]
VENUES = ["the old mill", "the harbor park", "the school hall", "the town square", "the river meadow", "the city library"]
PRICES = ["5 euros", "8 dollars", "12 pounds", "3 euros", "10 dollars", "6 pounds"]
THINGS_KEPT = ["passport", "garden tools", "spare glasses", "old letters", "winter boots", "camera"]
KEEP_PLACES = ["top drawer", "green shed", "kitchen cupboard", "wooden chest", "hall closet", "attic box"]
CITIES = ["Lisbon", "Vienna", "Krakow", "Dublin", "Porto", "Ghent", "Bergen", "Turin",
          "Tallinn", "Seville", "Lyon", "Riga", "Utrecht", "Bologna", "Zagreb", "Malmo"]
BOOKINGS = [("a hair salon", "a haircut"), ("a bike workshop", "a bike repair"), ("a music shop", "a piano tuning"),
            ("a pet grooming studio", "a dog wash"), ("a small spa", "a massage"), ("a garage", "an oil change")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
CLOCK = ["9:30", "10:15", "11:00", "2:45", "3:30", "4:00", "5:15", "6:30"]

CONVERSIONS = [("12", "inches", "centimetres"), ("2", "litres", "cups"), ("100", "degrees Fahrenheit", "degrees Celsius"),
               ("3", "miles", "kilometres"), ("5", "pounds", "kilograms"), ("1", "hour", "seconds"),
               ("250", "grams", "ounces"), ("10", "metres", "feet")]
PHRASES = ["Good luck with your exam", "The soup is too hot", "Where can I buy a ticket?",
           "I would like a glass of water", "See you next week", "My bag is lost",
           "What time does the museum open?", "Happy birthday, my friend"]
LANGUAGES = ["Spanish", "German", "Italian", "French", "Portuguese", "Dutch"]
SORT_WORDS = [["zebra", "apple", "mango", "kiwi"], ["violin", "drum", "cello", "flute", "harp"],
              ["Tokyo", "Cairo", "Lima", "Oslo"], ["oak", "birch", "maple", "pine", "ash"],
              ["red", "blue", "green", "amber"], ["Mercury", "Venus", "Earth", "Mars", "Jupiter"],
              ["sock", "hat", "glove", "scarf"], ["tiger", "lion", "otter", "bear", "deer"]]
VOWEL_WORDS = ["banana", "elephant", "umbrella", "kitchen", "strawberry", "octopus", "piano", "pencil"]


def share(pool: list, split: str) -> list:
    """The half of ``pool`` that belongs to ``split`` (rm: even positions, ppo: odd positions)."""
    return pool[SPLITS.index(split)::2]


class Deck:
    """Draw fillers without replacement from a shuffled copy, reshuffling when empty."""

    def __init__(self, items: list, rng: random.Random):
        self.items, self.rng, self.left = list(items), rng, []

    def draw(self):
        if not self.left:
            self.left = self.items[:]
            self.rng.shuffle(self.left)
        return self.left.pop()


class Fillers(dict):
    """The split's decks by pool name, plus the split itself (for split-specific examples)."""

    def __init__(self, split: str):
        super().__init__()
        self.split = split


def pick_kind(d: dict, name: str, n: int, rng: random.Random) -> int:
    """Which of a template's ``n`` variants to use: each comes up once before any repeats."""
    key = "kind:" + name
    if key not in d:
        d[key] = Deck(list(range(n)), rng)
    return d[key].draw()


# ----------------------------------------------------------------------------- check helpers
def max_words(n):
    return {"type": "max_words", "n": n}


def bullets(n):
    return {"type": "num_bullets", "n": n}


def numbered(n):
    return {"type": "num_numbered", "n": n}


def sentences(n):
    return {"type": "num_sentences", "n": n}


LOWER, UPPER, NO_COMMAS, QUOTED, TITLE = ({"type": t} for t in
                                          ("lowercase", "uppercase", "no_commas", "quoted", "title"))
SHORT_CHECKS = {"ns1": sentences(1), "mw8": max_words(8), "lc": LOWER, "nc": NO_COMMAS,
                "ew!": {"type": "ends_with", "text": "!"}}


def few_shot(instruction: str, label_in: str, label_out: str, examples, query: str) -> str:
    """An instruction, the query/response pairs, then the query with an empty response label."""
    lines = [instruction]
    for given, answer in examples:
        lines += [f"{label_in}: {given}", f"{label_out}: {answer}"]
    lines += [f"{label_in}: {query}", f"{label_out}:"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- templates
# Each template takes the split's fillers ``d`` and the rng and returns (prompt, checks, extra).
# Few-shot templates show the split's own half of their example pairs.

def gen_plain(d, rng):
    topic, (form, limit) = d["topic"].draw(), d["form"].draw()
    kind = pick_kind(d, "gen_plain", 12, rng)
    if kind == 0:
        return f"Write a {form} about {topic} in at most {limit} words.", [max_words(limit)], {}
    if kind == 1:
        return f"Write a {form} about {topic}. Use only lowercase letters.", [LOWER], {}
    if kind == 2:
        k = rng.choice([2, 3, 4])
        return f"Describe {topic} in exactly {k} sentences.", [sentences(k)], {}
    if kind == 3:
        a, b = d["include"].draw()
        return (f"Write a {form} about {topic} that includes the words \"{a}\" and \"{b}\".",
                [{"type": "include_words", "words": [a, b]}], {})
    if kind == 4:
        a, b = d["exclude"].draw()
        return (f"Write a {form} about {topic} without using the words \"{a}\" or \"{b}\".",
                [{"type": "exclude_words", "words": [a, b]}], {})
    if kind == 5:
        opening = d["opening"].draw()
        return (f"Write a {form} about {topic}. Start with the words \"{opening}\".",
                [{"type": "starts_with", "text": opening}], {})
    if kind == 6:
        ending = d["ending"].draw()
        return (f"Write a {form} about {topic} and end it with the sentence \"{ending}\"",
                [{"type": "ends_with", "text": ending}], {})
    if kind == 7:
        return (f"Write a {form} about {topic}. Put a title wrapped in double angular brackets, "
                f"like <<Title>>, on the first line.", [TITLE], {})
    if kind == 8:
        return f"Write a {form} about {topic} without using any commas.", [NO_COMMAS], {}
    # Open requests without a checkable instruction (about 30% of the set has none).
    if kind == 9:
        return f"Write a {form} about {topic}.", [], {}
    if kind == 10:
        return f"Write a {form} about {topic}, in any style you like.", [], {}
    return f"Write a {form} inspired by {topic}.", [], {}


def gen_user(d, rng):
    who, about = d["role_topic"].draw()
    msg = d["message"].draw()
    kind = pick_kind(d, "gen_user", 8, rng)
    if kind == 0:
        n = rng.choice([30, 40, 50, 60])
        return f"{who}. Write {msg} about {about} in at most {n} words.", [max_words(n)], {}
    if kind == 1:
        greeting = d["greeting"].draw()
        return (f"{who}. Write {msg} about {about}, starting with \"{greeting}\".",
                [{"type": "starts_with", "text": greeting}], {})
    if kind == 2:
        k = rng.choice([3, 4])
        return f"{who}. Write {msg} about {about} with exactly {k} bullet points.", [bullets(k)], {}
    if kind == 3:
        return f"{who}. Write {msg} about {about}, all in lowercase.", [LOWER], {}
    if kind == 4:
        signoff = d["signoff"].draw()
        return (f"{who}. Write {msg} about {about} that ends with \"{signoff}\"",
                [{"type": "ends_with", "text": signoff}], {})
    if kind == 5:
        return f"{who}. Help me write {msg} about {about}.", [], {}
    if kind == 6:
        return f"{who}. Write {msg} about {about} that sounds warm and welcoming.", [], {}
    return f"{who}. Write {msg} about {about}.", [], {}


def gen_few_shot(d, rng):
    if pick_kind(d, "gen_few_shot", 2, rng) == 0:
        examples = share([("a waterproof backpack", "Rain or shine, your things stay dry."),
                          ("a non-stick frying pan", "Every pancake slides out perfect."),
                          ("a solar phone charger", "Power from the sky, wherever you roam."),
                          ("a clip-on reading lamp", "Bright pages and a sleeping partner.")], d.split)
        prompt = few_shot("Write a one-sentence tagline of at most 12 words for each product.",
                          "Product", "Tagline", examples, d["tagline"].draw())
        return prompt, [sentences(1), max_words(12)], {}
    examples = share([("a vet visit on Monday at 3", "Don't forget: the vet at 3 on Monday."),
                      ("the dog's grooming on Saturday at 11", "Quick reminder: grooming at 11 on Saturday."),
                      ("the rent due on the 1st", "Reminder: rent is due on the 1st."),
                      ("the library talk on Wednesday at 6", "Don't miss the library talk on Wednesday at 6!"),
                      ("choir practice on Thursday evening", "See you at choir practice on Thursday evening!"),
                      ("a car service on Friday morning", "Your car service is on Friday morning.")], d.split)
    prompt = few_shot("Write a friendly reminder of at most 12 words for each event.",
                      "Event", "Reminder", examples, d["reminder"].draw())
    return prompt, [max_words(12)], {}


def open_plain(d, rng):
    concept = d["concept"].draw()
    kind = pick_kind(d, "open_plain", 5, rng)
    if kind == 0:
        n = rng.choice([40, 50, 60])
        return f"Explain {concept} in at most {n} words.", [max_words(n)], {}
    if kind == 1:
        k = rng.choice([2, 3])
        return (f"Explain {concept} to {d['audience'].draw()} in exactly {k} sentences.",
                [sentences(k)], {})
    if kind == 2:
        return f"Explain {concept}. Answer in lowercase.", [LOWER], {}
    if kind == 3:
        return f"Explain {concept} to {d['audience'].draw()}.", [], {}
    return f"Explain {concept}.", [], {}


def open_user(d, rng):
    situation, question = d["user_question"].draw()
    if rng.random() < 0.5:
        n = rng.choice([40, 50, 60])
        return f"{situation}. {question} Please answer in at most {n} words.", [max_words(n)], {}
    return f"{situation}. {question}", [], {}


def brainstorm_plain(d, rng):
    kind = pick_kind(d, "brainstorm_plain", 6, rng)
    k = rng.choice([3, 4, 5, 6])
    if kind == 0:
        return f"Give me {k} ideas for {d['idea'].draw()} as a bulleted list.", [bullets(k)], {}
    if kind == 1:
        return f"List {k} {d['list'].draw()} as a numbered list.", [numbered(k)], {}
    if kind == 2:
        return (f"Brainstorm {k} names for {d['name'].draw()}, one per bullet point, all in lowercase.",
                [bullets(k), LOWER], {})
    if kind == 3:
        return f"Can you brainstorm some {d['list'].draw()}?", [], {}
    if kind == 4:
        return f"Help me come up with a name for {d['name'].draw()}.", [], {}
    return f"What are some good ideas for {d['idea'].draw()}?", [], {}


def brainstorm_user(d, rng):
    who, goal = d["role_goal"].draw()
    k = rng.choice([3, 4, 5])
    if rng.random() < 0.5:
        return f"{who}. Suggest {k} ideas for {goal} as a numbered list.", [numbered(k)], {}
    return f"{who}. Can you suggest some ideas for {goal}?", [], {}


def brainstorm_few_shot(d, rng):
    examples = share([("a shop that sells only hats", "Top Notch"), ("a shop that sells only maps", "Paper Trails"),
                      ("a cafe for cat lovers", "The Purring Cup"), ("a bakery open all night", "Night Loaf")], d.split)
    prompt = few_shot("Suggest a name of at most 3 words for each new shop.",
                      "Shop", "Name", examples, d["shop"].draw())
    return prompt, [max_words(3)], {}


def chat_user(d, rng):
    n = rng.choice([20, 30, 40])
    if rng.random() < 0.5:
        return f"Guess what, I {d['news'].draw()}!", [], {}
    return (f"I {d['news'].draw()}! Reply with a short, friendly message of at most {n} words.",
            [max_words(n)], {})


def rewrite_plain(d, rng):
    kind = pick_kind(d, "rewrite_plain", 3, rng)
    if kind == 0:
        text = d["informal"].draw()
        if rng.random() < 0.5:
            return (f"Rewrite this message in a polite, professional tone: \"{text}\"", [], {})
        return (f"Rewrite this message in a polite, professional tone, in one sentence: \"{text}\"",
                [sentences(1)], {})
    if kind == 1:
        return f"Rewrite this sentence without any commas: \"{d['commas'].draw()}\"", [NO_COMMAS], {}
    n = rng.choice([10, 12])
    return f"Shorten this sentence to at most {n} words: \"{d['long'].draw()}\"", [max_words(n)], {}


def rewrite_few_shot(d, rng):
    instruction, check_names, examples, _ = d["rewrite_task"].draw()
    query = d["rewrite_query:" + instruction].draw()
    return (few_shot(instruction, "Input", "Output", share(examples, d.split), query),
            [SHORT_CHECKS[c] for c in check_names], {})


def summary_plain(d, rng):
    note = d["note"].draw()
    kind = pick_kind(d, "summary_plain", 5, rng)
    if kind == 0:
        return f"Summarize this in one sentence: \"{note}\"", [sentences(1)], {}
    if kind == 1:
        n = rng.choice([15, 20, 25])
        return f"Summarize this in at most {n} words: \"{note}\"", [max_words(n)], {}
    if kind == 2:
        k = rng.choice([2, 3])
        return f"Summarize this as exactly {k} bullet points: \"{note}\"", [bullets(k)], {}
    if kind == 3:
        return f"Summarize this in lowercase, in at most 25 words: \"{note}\"", [LOWER, max_words(25)], {}
    return f"What is the main point of this notice? \"{note}\"", [], {}


def summary_user(d, rng):
    note = d["note"].draw()
    n = rng.choice([15, 20])
    if rng.random() < 0.5:
        return f"Someone sent me this notice and I don't have time to read it: \"{note}\" What does it say?", [], {}
    return (f"I'm busy and someone sent me this notice: \"{note}\" Tell me what it says in at most {n} words.",
            [max_words(n)], {})


def summary_few_shot(d, rng):
    examples = share([("The heating will be off on Monday while the boiler is serviced.", "Heating off Monday"),
                      ("The team photo will be taken on Thursday at noon in the garden.", "Team photo Thursday at noon"),
                      ("Our new intern, Leo, starts tomorrow, so please say hello.", "Welcome our new intern Leo"),
                      ("Please return borrowed chairs to room 12 by Friday.", "Return chairs by Friday")], d.split)
    prompt = few_shot("Write an email subject line of at most 6 words for each note.",
                      "Note", "Subject", examples, d["subject_note"].draw())
    return prompt, [max_words(6)], {}


def classify_few_shot(d, rng):
    kind = pick_kind(d, "classify_few_shot", 3, rng)
    if kind == 0:
        review, _ = d["review"].draw()
        examples = share([("It fell apart the first time I washed it.", "negative"),
                          ("The strap snapped on the second day.", "negative"),
                          ("Sturdy, light, and easy to set up.", "positive"),
                          ("Fits perfectly and the color is lovely.", "positive")], d.split)
        prompt = few_shot("Label each product review as positive or negative.", "Review", "Label",
                          examples, review)
        return prompt, [{"type": "one_of", "options": ["positive", "negative"]}], {}
    if kind == 1:
        question, _ = d["question_topic"].draw()
        examples = share([("What is a good marinade for chicken?", "cooking"),
                          ("Can I bake cookies without butter?", "cooking"),
                          ("Do I need a passport to visit Canada?", "travel"),
                          ("Which train goes from Rome to Naples?", "travel"),
                          ("How does compound interest work?", "money"),
                          ("Is a savings account better than cash?", "money")], d.split)
        prompt = few_shot("Sort each question into one topic: cooking, travel or money.", "Question",
                          "Topic", examples, question)
        return prompt, [{"type": "one_of", "options": ["cooking", "travel", "money"]}], {}
    animal, _ = d["animal"].draw()
    examples = share([("eagle", "bird"), ("robin", "bird"), ("salmon", "fish"), ("cod", "fish"),
                      ("lizard", "reptile"), ("gecko", "reptile"), ("horse", "mammal"), ("rabbit", "mammal")], d.split)
    prompt = few_shot("Name the class of each animal: bird, mammal, reptile or fish.", "Animal", "Class",
                      examples, animal)
    return prompt, [{"type": "one_of", "options": ["bird", "mammal", "reptile", "fish"]}], {}


def classify_plain(d, rng):
    item, a, b = d["either_or"].draw()
    options = [a, b] if rng.random() < 0.5 else [b, a]
    return (f"Is {item} a {options[0]} or a {options[1]}? Answer with only \"{options[0]}\" or \"{options[1]}\".",
            [{"type": "one_of", "options": options}], {})


def classify_user(d, rng):
    ticket, _ = d["ticket"].draw()
    return (f"I sort support tickets for an online store. Which team should handle this one: \"{ticket}\" "
            f"Answer with exactly one of: billing, technical, shipping.",
            [{"type": "one_of", "options": ["billing", "technical", "shipping"]}], {})


def closed_plain(d, rng):
    kind = pick_kind(d, "closed_plain", 3, rng)
    if kind == 0:
        name, place, street, landmark = d["place_name"].draw(), d["place_kind"].draw(), d["street"].draw(), d["landmark"].draw()
        weekday, weekend = d["time"].draw(), d["time"].draw()
        while weekend == weekday:
            weekend = d["time"].draw()
        passage = (f"The {name} {place} opens at {weekday} on weekdays and at {weekend} on weekends. "
                   f"It is on {street}, next to the {landmark}.")
        question, reference = rng.choice([
            (f"What time does the {place} open on weekends?", weekend),
            (f"Which street is the {place} on?", street),
            (f"What is the {place} next to?", landmark)])
    elif kind == 1:
        person, job, town, hobby, year = (d["person"].draw(), d["job"].draw(), d["town"].draw(),
                                          d["hobby"].draw(), d["year"].draw())
        article = "an" if job[0] in "aeiou" else "a"
        passage = (f"{person} was born in {town} in {year}, worked as {article} {job} for thirty years, "
                   f"and took up {hobby} after retiring.")
        question, reference = rng.choice([
            (f"What hobby did {person} take up after retiring?", hobby),
            (f"In which town was {person} born?", town),
            (f"What was {person}'s job?", job)])
    else:
        event, month, venue, price = d["event"].draw(), d["month"].draw(), d["venue"].draw(), d["price"].draw()
        passage = (f"This year's {event} takes place in {month} at {venue}. Tickets cost {price}, "
                   f"and children under 12 get in free.")
        question, reference = rng.choice([
            (f"How much does a ticket to the {event} cost?", price),
            (f"Where does the {event} take place?", venue),
            (f"In which month is the {event}?", month)])
    prompt = f"Passage: {passage}\nQuestion: {question}"
    if rng.random() < 0.5:
        return prompt + " Answer in at most 6 words.", [max_words(6)], {"reference": reference}
    return prompt, [], {"reference": reference}


def closed_few_shot(d, rng):
    person, thing, place = d["person"].draw(), d["kept"].draw(), d["keep_place"].draw()
    examples = share([("The spare key is under the flower pot.", "Where is the spare key?", "under the flower pot"),
                      ("Mira hangs her coat behind the kitchen door.", "Where does Mira hang her coat?",
                       "behind the kitchen door"),
                      ("Lars parks his van behind the bakery.", "Where does Lars park his van?", "behind the bakery"),
                      ("The old photos are in a shoebox upstairs.", "Where are the old photos?",
                       "in a shoebox upstairs")], d.split)
    lines = ["Answer each question in at most 6 words, using the sentence given."]
    for sentence, question, answer in examples:
        lines += [f"Sentence: {sentence}", f"Question: {question}", f"Answer: {answer}"]
    lines += [f"Sentence: {person} keeps the {thing} in the {place}.",
              f"Question: Where does {person} keep the {thing}?", "Answer:"]
    return "\n".join(lines), [max_words(6)], {"reference": place}


def extract_plain(d, rng):
    if pick_kind(d, "extract_plain", 2, rng) == 0:
        a, b, c = d["person"].draw(), d["person"].draw(), d["person"].draw()
        while len({a, b, c}) < 3:
            b, c = d["person"].draw(), d["person"].draw()
        sentence = f"{a} and {b} waited at the {d['landmark'].draw()} until {c} arrived with the tickets."
        return (f"Extract the names of the people in this sentence as bullet points: \"{sentence}\"",
                [bullets(3)], {})
    a, b, c = d["city"].draw(), d["city"].draw(), d["city"].draw()
    while len({a, b, c}) < 3:
        b, c = d["city"].draw(), d["city"].draw()
    sentence = f"The tour starts in {a}, stops for two nights in {b} and ends in {c}."
    return (f"Extract the cities from this sentence and return them as a JSON list: \"{sentence}\"",
            [{"type": "json"}], {})


def extract_few_shot(d, rng):
    kind = pick_kind(d, "extract_few_shot", 3, rng)
    if kind == 0:
        examples = share([("The meeting starts at 9:30 in room 4.", "9:30"), ("Dinner is served at 8:15 sharp.", "8:15"),
                          ("Our train leaves at 7:05 tomorrow.", "7:05"), ("The shop closes at 5:45 today.", "5:45")],
                         d.split)
        query = f"The {d['event'].draw()} begins at {d['clock'].draw()} on {d['day'].draw()}."
        return few_shot("Extract the time from each sentence, in at most 2 words.", "Sentence", "Time",
                        examples, query), [max_words(2)], {}
    if kind == 1:
        examples = share([("The old mill was built in 1887.", "1887"), ("The bridge was finished in 1932.", "1932"),
                          ("She moved to Canada in 2004.", "2004"), ("Our club was founded in 1976.", "1976")],
                         d.split)
        query = f"{d['person'].draw()} opened the {d['place_kind'].draw()} in {d['year'].draw()}."
        return few_shot("Extract the year from each sentence, as a single word.", "Sentence", "Year",
                        examples, query), [max_words(1)], {}
    examples = share([("We spent a rainy week in Galway.", "Galway"), ("Her sister teaches art in Antwerp.", "Antwerp"),
                      ("My cousin studies music in Leipzig.", "Leipzig"), ("They opened a small cafe in Graz.", "Graz")],
                     d.split)
    query = f"{d['person'].draw()} found a cheap flat in {d['city'].draw()} last spring."
    return few_shot("Extract the city from each sentence, in at most 2 words.", "Sentence", "City",
                    examples, query), [max_words(2)], {}


def extract_user(d, rng):
    business, service = d["booking"].draw()
    person, day, clock = d["person"].draw(), d["day"].draw(), d["clock"].draw()
    message = f"Hi, this is {person}. Could I book {service} on {day} at {clock}? Thanks!"
    return (f"I run {business} and received this message: \"{message}\" Extract the booking as JSON "
            f"with the keys \"name\", \"day\" and \"time\".",
            [{"type": "json", "keys": ["name", "day", "time"]}], {})


def other_plain(d, rng):
    kind = pick_kind(d, "other_plain", 6, rng)
    if kind == 0:
        x, a, b = d["conversion"].draw()
        return f"Convert {x} {a} to {b}. Answer in one sentence.", [sentences(1)], {}
    if kind == 1:
        return (f"Translate \"{d['phrase'].draw()}\" into {d['language'].draw()}. Reply with the "
                f"translation only, in double quotes.", [QUOTED], {})
    if kind == 2:
        items = d["sort_words"].draw()
        return (f"Sort these words alphabetically, one per line starting with \"- \": {', '.join(items)}.",
                [bullets(len(items))], {})
    if kind == 4:
        x, a, b = d["conversion"].draw()
        return f"How do I convert {a} to {b}? Use {x} {a} as an example.", [], {}
    if kind == 5:
        return f"How would you say \"{d['phrase'].draw()}\" in {d['language'].draw()}?", [], {}
    return (f"How many vowels are in the word \"{d['vowel_word'].draw()}\"? Reply with the number only.",
            [max_words(1)], {})


# How many templated prompts each split gets: (template, category, style, count). With the
# hand-written core this gives the kit's target mix, close to the InstructGPT prompt
# distribution (generation ~28%, open QA ~12%, brainstorming ~10%, chat ~8%, rewrite ~8%,
# summarization ~7%, classification ~7%, closed QA ~9%, extract ~6%, other ~5%) and about
# 60% plain / 15% few-shot / 25% user-based; tests/test_prompts_rm_ppo.py checks the mix.
PLAN = [
    (gen_plain, "generation", "plain", 17), (gen_user, "generation", "user_based", 10),
    (gen_few_shot, "generation", "few_shot", 2),
    (open_plain, "open_qa", "plain", 3), (open_user, "open_qa", "user_based", 2),
    (brainstorm_plain, "brainstorming", "plain", 5), (brainstorm_user, "brainstorming", "user_based", 5),
    (brainstorm_few_shot, "brainstorming", "few_shot", 1),
    (chat_user, "chat", "user_based", 2),
    (rewrite_plain, "rewrite", "plain", 3), (rewrite_few_shot, "rewrite", "few_shot", 5),
    (summary_plain, "summarization", "plain", 4), (summary_user, "summarization", "user_based", 2),
    (summary_few_shot, "summarization", "few_shot", 1),
    (classify_few_shot, "classification", "few_shot", 4), (classify_plain, "classification", "plain", 2),
    (classify_user, "classification", "user_based", 1),
    (closed_plain, "closed_qa", "plain", 4), (closed_few_shot, "closed_qa", "few_shot", 1),
    (extract_plain, "extract", "plain", 2), (extract_few_shot, "extract", "few_shot", 3),
    (extract_user, "extract", "user_based", 1),
    (other_plain, "other", "plain", 3),
]


def decks(split: str, rng: random.Random) -> Fillers:
    """One deck per filler pool, holding only this split's half of the pool."""
    pools = {
        "topic": TOPICS, "form": FORMS, "include": INCLUDE_PAIRS, "exclude": EXCLUDE_PAIRS,
        "opening": OPENINGS, "ending": ENDINGS, "role_topic": ROLE_TOPICS, "message": MESSAGES,
        "greeting": GREETINGS, "signoff": SIGNOFFS, "tagline": TAGLINE_ITEMS, "reminder": REMINDER_EVENTS,
        "concept": CONCEPTS, "audience": AUDIENCES, "user_question": USER_QUESTIONS, "idea": IDEA_THINGS,
        "list": LIST_THINGS, "name": NAME_THINGS, "role_goal": ROLE_GOALS, "shop": SHOP_KINDS,
        "news": CHAT_NEWS, "informal": INFORMAL, "commas": COMMA_SENTENCES, "long": LONG_SENTENCES,
        "rewrite_task": FEW_SHOT_REWRITES, "note": NOTES, "subject_note": SUBJECT_LINE_NOTES,
        "review": REVIEWS, "question_topic": QUESTION_TOPICS, "animal": ANIMALS, "either_or": EITHER_OR,
        "ticket": TICKETS, "place_name": PLACE_NAMES, "place_kind": PLACE_KINDS, "street": STREETS,
        "landmark": LANDMARKS, "time": TIMES, "person": PEOPLE, "job": JOBS, "town": TOWNS,
        "hobby": HOBBIES, "year": YEARS, "event": EVENT_KINDS, "month": MONTHS, "venue": VENUES,
        "price": PRICES, "kept": THINGS_KEPT, "keep_place": KEEP_PLACES, "city": CITIES,
        "booking": BOOKINGS, "day": DAYS, "clock": CLOCK,
        "conversion": CONVERSIONS, "phrase": PHRASES, "language": LANGUAGES, "sort_words": SORT_WORDS,
        "vowel_word": VOWEL_WORDS,
    }
    # Pools whose items only shape the wording (forms, constraints, labels) are shared; pools
    # that carry the content (topics, passages, queries) are halved so the splits differ.
    shared = {"form", "include", "exclude", "opening", "ending", "message", "greeting", "signoff",
              "audience", "time", "job", "hobby", "year", "month", "price", "day", "clock", "language",
              "rewrite_task", "street", "landmark", "place_kind", "event", "booking"}
    d = Fillers(split)
    for name, pool in pools.items():
        d[name] = Deck(pool if name in shared else share(pool, split), rng)
    for instruction, _, _, queries in FEW_SHOT_REWRITES:
        d["rewrite_query:" + instruction] = Deck(share(queries, split), rng)
    return d


def build_templates(split: str, taken: set[str]) -> list[dict]:
    """The templated records of ``split`` (no ids yet), skipping prompts whose text is taken."""
    rng = random.Random(f"labkit-prompts-{split}")  # str seeds are stable across runs and platforms
    d = decks(split, rng)
    taken = set(taken)
    records = []
    for template, category, style, count in PLAN:
        made = 0
        for _ in range(50 * count):
            if made == count:
                break
            prompt, checks, extra = template(d, rng)
            key = normalise(prompt)
            if key in taken:
                continue
            taken.add(key)
            made += 1
            records.append({"prompt": prompt, "category": category, "style": style, "split": split,
                            "checks": checks, **extra, "harmful": False, "source": "template"})
        if made < count:
            raise RuntimeError(f"{template.__name__}: only {made} of {count} distinct prompts for {split}")
    return records


def build_split(split: str, records: list[dict], other_texts: set[str]) -> list[dict]:
    """Hand-written records of ``records`` (unchanged) followed by freshly numbered template records."""
    hand = [r for r in records if r.get("source", "hand") != "template"]
    numbers = [int(r["id"].split("-")[1]) for r in hand]
    start = max(numbers, default=0) + 1
    taken = {normalise(r["prompt"]) for r in hand} | set(other_texts)
    out = list(hand)
    for i, r in enumerate(build_templates(split, taken), start):
        out.append({"id": f"{split}-{i:04d}", **r})
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def other_prompt_texts(prompt_dir: Path, split: str) -> set[str]:
    """Normalised prompts of the other splits' hand-written records (templates cannot collide:
    the splits draw their content fillers from disjoint halves of each pool)."""
    texts = set()
    for path in sorted(prompt_dir.glob("*.jsonl")):
        if path.stem != split:
            texts |= {normalise(r["prompt"]) for r in read_jsonl(path) if r.get("source", "hand") != "template"}
    return texts


def dumps(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    parser.add_argument("--dir", type=Path, default=PROMPT_DIR, help="folder holding <split>.jsonl")
    args = parser.parse_args(argv)
    stale = []
    for split in SPLITS:
        path = args.dir / f"{split}.jsonl"
        old = read_jsonl(path)
        new = build_split(split, old, other_prompt_texts(args.dir, split))
        if new != old:
            stale.append(split)
            if not args.check:
                path.write_text(dumps(new), encoding="utf-8")
        n_template = sum(r.get("source") == "template" for r in new)
        print(f"{split}: {len(new)} prompts ({len(new) - n_template} hand-written, {n_template} templated)")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run scripts/make_templated_prompts.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
